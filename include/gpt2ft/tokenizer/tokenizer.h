// The tokenizer interface shared by GPT-2 byte-level BPE and SentencePiece, and the function
// that picks the right one for a path.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace gpt2ft {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Appends the ids of `text` to `out`. Thread-safe: workers share one tokenizer.
  virtual void encode(std::string_view text, std::vector<uint32_t>& out) const = 0;
  virtual std::string decode(const std::vector<uint32_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  // The end-of-text id that separates documents; nullopt when the vocabulary has none.
  virtual std::optional<uint32_t> eot_id() const = 0;
  // "kind:hash" over everything that decides the ids, so shards can be matched to a model.
  virtual std::string identity() const = 0;
  // "gpt2-bpe" or "sentencepiece".
  virtual std::string kind() const = 0;
  // The folder or file it was loaded from.
  virtual const std::filesystem::path& source() const = 0;

  std::vector<uint32_t> encode(std::string_view text) const {
    std::vector<uint32_t> out;
    encode(text, out);
    return out;
  }
  // eot_id() or an Error saying the vocabulary has no end-of-text token.
  uint32_t require_eot_id() const;
};

// A folder with vocab.json + merges.txt, encoder.json + vocab.bpe or tokenizer.json gives
// GPT-2 byte-level BPE; a SentencePiece .model file (or a folder holding tokenizer.model
// or spiece.model) gives SentencePiece. Anything else is an Error saying what was expected.
std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& path);

// Whether the folder holds the files of a tokenizer load_tokenizer reads (not merely, say, a
// tokenizer_config.json or generation_config.json).
bool folder_has_tokenizer(const std::filesystem::path& dir);

// 64-bit FNV-1a, for identity hashes.
uint64_t fnv1a64(std::string_view bytes, uint64_t seed = 0xcbf29ce484222325ull);
std::string hex64(uint64_t value);

}  // namespace gpt2ft
