// SentencePiece models (.model files) through libsentencepiece, and training a new one with
// SentencePiece's own trainer: the path for languages GPT-2's vocabulary serves poorly.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "gpt2ft/tokenizer/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace gpt2ft {

class SentencePieceTokenizer : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::filesystem::path& model_file);
  ~SentencePieceTokenizer() override;

  void encode(std::string_view text, std::vector<uint32_t>& out) const override;
  using Tokenizer::encode;
  std::string decode(const std::vector<uint32_t>& ids) const override;
  int64_t vocab_size() const override;
  // The model's </s> (eos) id, or nullopt when it was trained without one.
  std::optional<uint32_t> eot_id() const override;
  std::string identity() const override { return identity_; }
  std::string kind() const override { return "sentencepiece"; }
  const std::filesystem::path& source() const override { return source_; }

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  std::string identity_;
  std::filesystem::path source_;
};

struct SentencePieceTrainOptions {
  int64_t vocab_size = 8000;
  std::string model_type = "bpe";   // "bpe" or "unigram"
  double character_coverage = 0.9995;
  int64_t max_sentences = 2000000;  // lines sampled for training
  int threads = 0;                  // 0 = all cores
};

// Trains on `inputs` (text files, one sentence per line) and writes <output_prefix>.model
// and .vocab. Returns the .model path.
std::filesystem::path train_sentencepiece(const std::vector<std::filesystem::path>& inputs,
                                          const std::filesystem::path& output_prefix,
                                          const SentencePieceTrainOptions& options);

}  // namespace gpt2ft
