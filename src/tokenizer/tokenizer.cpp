// Tokenizer selection and identity hashing.
#include "gpt2ft/tokenizer/tokenizer.h"

#include <cstdio>

#include "gpt2ft/core/error.h"
#include "gpt2ft/tokenizer/byte_level_bpe.h"
#include "gpt2ft/tokenizer/sentencepiece_tokenizer.h"

namespace gpt2ft {
namespace fs = std::filesystem;

uint32_t Tokenizer::require_eot_id() const {
  if (auto id = eot_id()) return *id;
  throw Error(source().string() + ": the vocabulary has no end-of-text token (\"<|endoftext|>\" for BPE, "
                                  "eos for SentencePiece) to separate documents");
}

std::unique_ptr<Tokenizer> load_tokenizer(const fs::path& path) {
  return with_context("loading tokenizer " + path.string(), [&]() -> std::unique_ptr<Tokenizer> {
    if (fs::is_regular_file(path)) {
      if (path.extension() == ".model") return std::make_unique<SentencePieceTokenizer>(path);
      throw Error(path.string() + ": expected a folder of GPT-2 tokenizer files or a SentencePiece .model file");
    }
    if (!fs::is_directory(path)) throw Error(path.string() + ": no such file or folder");
    if (ByteLevelBpe::folder_has_files(path)) return ByteLevelBpe::from_folder(path);
    for (const char* name : {"tokenizer.model", "spiece.model"}) {
      if (fs::exists(path / name)) return std::make_unique<SentencePieceTokenizer>(path / name);
    }
    throw Error(path.string() + ": no tokenizer files (expected vocab.json + merges.txt, encoder.json + vocab.bpe, "
                                "tokenizer.json, or a SentencePiece tokenizer.model)");
  });
}

uint64_t fnv1a64(std::string_view bytes, uint64_t seed) {
  uint64_t h = seed;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

std::string hex64(uint64_t value) {
  char buffer[17];
  std::snprintf(buffer, sizeof(buffer), "%016llx", static_cast<unsigned long long>(value));
  return buffer;
}

bool folder_has_tokenizer(const fs::path& dir) {
  return ByteLevelBpe::folder_has_files(dir) || fs::exists(dir / "tokenizer.model") || fs::exists(dir / "spiece.model");
}

}  // namespace gpt2ft
