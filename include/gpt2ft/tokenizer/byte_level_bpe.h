// GPT-2's byte-level BPE: text -> pieces (Gpt2Pretokenizer) -> bytes -> merges by rank.
// Loads Hugging Face vocab.json + merges.txt, OpenAI encoder.json + vocab.bpe, or a
// tokenizer.json. Literal "<|endoftext|>" in text is encoded as ordinary text (like
// tiktoken's encode_ordinary); documents are separated by eot_id() explicitly.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gpt2ft/tokenizer/gpt2_pretokenizer.h"
#include "gpt2ft/tokenizer/tokenizer.h"

namespace gpt2ft {

class ByteLevelBpe : public Tokenizer {
 public:
  // vocab: token strings in GPT-2's printable byte alphabet with their ids;
  // merges: pairs in rank order. Inconsistent tables are Errors naming `source`.
  ByteLevelBpe(const std::vector<std::pair<std::string, uint32_t>>& vocab,
               const std::vector<std::pair<std::string, std::string>>& merges,
               std::filesystem::path source);
  ~ByteLevelBpe() override;

  // Reads a folder with vocab.json + merges.txt, encoder.json + vocab.bpe or tokenizer.json.
  static std::unique_ptr<ByteLevelBpe> from_folder(const std::filesystem::path& dir);
  static bool folder_has_files(const std::filesystem::path& dir);

  void encode(std::string_view text, std::vector<uint32_t>& out) const override;
  using Tokenizer::encode;
  std::string decode(const std::vector<uint32_t>& ids) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_bytes_.size()); }
  std::optional<uint32_t> eot_id() const override { return eot_id_; }
  std::string identity() const override { return identity_; }
  std::string kind() const override { return "gpt2-bpe"; }
  const std::filesystem::path& source() const override { return source_; }

  // Tokens added after the BPE vocabulary (a chat template's control tokens such as
  // "<|im_start|>"), taking ids vocab_size() on, in order. encode() never produces them: only
  // a template's own text does (control_id). Not thread-safe: add before sharing.
  void add_tokens(const std::vector<std::string>& tokens);
  const std::vector<std::string>& added_tokens() const { return added_; }
  int64_t base_vocab_size() const { return vocab_size() - static_cast<int64_t>(added_.size()); }
  // The id of a control token's string: an added token, or "<|endoftext|>".
  std::optional<uint32_t> control_id(std::string_view token) const;
  // The number of raw bytes a token stands for (an added token: its string's), from a compact
  // table: reading it for every token of a text stays in cache.
  size_t token_length(uint32_t id) const { return token_lengths_[id]; }

  // BPE of one piece (raw bytes), appended to out. Exposed for tests and benchmarks.
  void encode_piece(std::string_view piece, std::vector<uint32_t>& out) const;

 private:
  struct MergeTable;

  void merge_short(std::vector<uint32_t>& symbols) const;
  void merge_long(std::vector<uint32_t>& symbols) const;

  Gpt2Pretokenizer pretokenizer_;
  std::vector<std::string> id_to_bytes_;
  std::vector<uint32_t> token_lengths_;  // id_to_bytes_[id].size()
  uint32_t byte_to_id_[256];
  std::unique_ptr<MergeTable> merges_;
  std::optional<uint32_t> eot_id_;
  std::vector<std::string> added_;
  std::string identity_;
  std::filesystem::path source_;
  uint64_t instance_ = 0;  // keys the per-thread piece cache
};

// GPT-2's reversible map between bytes and printable characters ("Ġ" is the space byte).
const std::vector<std::string>& gpt2_byte_to_unicode();
// The raw bytes of a token written in that alphabet; an Error if a character is outside it.
std::string gpt2_token_to_bytes(const std::string& token, const std::string& where);
// The same into `bytes`; false (bytes unspecified) for a character outside the alphabet.
bool try_gpt2_token_to_bytes(std::string_view token, std::string& bytes);

}  // namespace gpt2ft
