// GPT-2's pre-tokenizer: the regex that cuts text into pieces before BPE,
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// run by PCRE2 (JIT, UTF, UCP) for the Unicode letter/number classes and the lookahead.
// Bytes that are not valid UTF-8 are never part of a match: each one is a piece by itself,
// and the valid text around it is split as if it ended/started there.
#pragma once

#include <memory>
#include <string_view>
#include <vector>

namespace gpt2ft {

class Gpt2Pretokenizer {
 public:
  Gpt2Pretokenizer();
  ~Gpt2Pretokenizer();
  Gpt2Pretokenizer(const Gpt2Pretokenizer&) = delete;
  Gpt2Pretokenizer& operator=(const Gpt2Pretokenizer&) = delete;

  // Replaces `pieces` with the pieces of `text`, in order; together they cover every byte.
  // Thread-safe.
  void split(std::string_view text, std::vector<std::string_view>& pieces) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The end of the longest run of valid UTF-8 starting at text[begin].
size_t valid_utf8_end(std::string_view text, size_t begin);

}  // namespace gpt2ft
