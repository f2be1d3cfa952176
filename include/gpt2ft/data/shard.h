// Token shards in llm.c's format: a header of 256 int32 (magic, version, token count, 0...)
// followed by the tokens, uint16 (magic 20240520, version 1) or, for vocabularies larger
// than 65,536, uint32 (magic 20240801, version 7).
//
// Document shards (instruction data, ours: magic 20261201, version 2) add where each document
// starts and which tokens are targets. Header: magic, version, token count N, token bytes (2 or
// 4), document count D, then a checksum as two int32 (low, high): of the header's N, token bytes
// and D (as 12 bytes), times 0x9E3779B97F4A7C15, plus that of the two sections below (modulo
// 2^64). Version 1, whose checksum covers the sections alone, still reads.
// After the header: the N tokens; zero bytes up to a multiple of 4; D uint32 document starts
// (the first is 0, increasing, each below N; a document runs to the next start); ceil(N/8)
// bytes of target bits (token i is a target when bit i % 8 of byte i / 8 is set).
//
// Preference shards (DPO pairs, ours: magic 20261206, version 1) are document shards in that
// same layout and checksum whose documents come in pairs: document 2k is example k's prompt
// followed by its chosen continuation, 2k+1 the same prompt followed by the rejected one.
// Each continuation's tokens (and its closing end-of-text) are the targets; the prompt's are
// not. Checked on open: an even count, and in each pair the same prompt and a target on each
// side.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/mapped_file.h"

namespace gpt2ft {

inline constexpr int32_t kShardMagicU16 = 20240520;
inline constexpr int32_t kShardVersionU16 = 1;
inline constexpr int32_t kShardMagicU32 = 20240801;
inline constexpr int32_t kShardVersionU32 = 7;
inline constexpr int32_t kShardMagicDocuments = 20261201;
inline constexpr int32_t kShardVersionDocuments = 2;  // 1 (no header counts in the checksum) still reads
inline constexpr int32_t kShardMagicPreference = 20261206;
inline constexpr int32_t kShardVersionPreference = 1;
inline constexpr size_t kShardHeaderInts = 256;
inline constexpr size_t kShardHeaderBytes = kShardHeaderInts * sizeof(int32_t);

// 2 when every id of a vocabulary fits in uint16, else 4.
int shard_token_bytes(int64_t vocab_size);

// What a document shard holds beside its tokens.
struct ShardDocuments {
  std::vector<uint32_t> starts;  // the first token of each document: 0, then increasing
  std::vector<bool> targets;     // per token: predicted and counted in the loss
  bool pairs = false;            // a preference shard: documents 2k and 2k+1 are example k's chosen and rejected
};

// A memory-mapped shard, validated on open (magic, version, size matching the header; for a
// document shard also the sections' checksum and the starts' order).
class ShardReader {
 public:
  explicit ShardReader(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return file_.path(); }
  int64_t num_tokens() const { return num_tokens_; }
  int token_bytes() const { return token_bytes_; }
  uint32_t token(int64_t i) const;
  // Document shards only (the others have no documents and every token is a target).
  bool has_documents() const { return starts_ != nullptr; }
  // A preference shard: documents 2k and 2k+1 are one example's chosen and rejected.
  bool holds_pairs() const { return pairs_; }
  // Tokens of document d before its first target (a pair's shared prompt).
  int64_t prompt_length(int64_t d) const;
  int64_t num_documents() const { return num_documents_; }
  int64_t document_start(int64_t d) const;
  int64_t document_end(int64_t d) const;  // one past its last token
  bool is_target(int64_t i) const {
    return !targets_ || ((targets_[i >> 3] >> (i & 7)) & 1) != 0;
  }
  // Copies tokens [begin, begin + count) into out as int64 (torch's index type).
  void read(int64_t begin, int64_t count, int64_t* out) const;
  // Every id below vocab_size, or an Error naming the file, the first bad id and its position.
  void check_ids(int64_t vocab_size) const;

 private:
  void open_documents(const int32_t* header);
  void check_pairs(const std::string& where) const;

  MappedFile file_;
  int64_t num_tokens_ = 0;
  int token_bytes_ = 2;
  int64_t num_documents_ = 0;
  bool pairs_ = false;
  const uint8_t* starts_ = nullptr;   // D uint32, unaligned access through memcpy
  const uint8_t* targets_ = nullptr;  // ceil(N/8) bytes
};

// Writes one shard as its tokens arrive (the tokenizer's output streams to disk while it
// works), atomically: nothing appears under `path` before finish(). token_bytes 2 or 4; each
// id is checked to fit as it comes.
class ShardWriter {
 public:
  ShardWriter(const std::filesystem::path& path, int token_bytes);
  void append(const uint32_t* ids, size_t count);
  int64_t num_tokens() const { return tokens_; }
  // Writes the header (with `documents`, a document shard: its starts checked, its targets one
  // per token, both written after the tokens), then fsyncs and renames the file into place.
  void finish(const ShardDocuments* documents = nullptr);

 private:
  std::filesystem::path path_;
  int token_bytes_;
  AtomicFileWriter file_;
  int64_t tokens_ = 0;
  std::vector<uint8_t> bytes_;  // the tokens of one append at token_bytes_
};

// Writes a shard atomically (a ShardWriter given all the tokens at once).
void write_shard(const std::filesystem::path& path, const std::vector<uint32_t>& tokens,
                 int token_bytes, const ShardDocuments* documents = nullptr);

// "a.bin, b.bin and 3 more": files for a message.
std::string describe_files(const std::vector<std::filesystem::path>& files);

// The files a glob pattern matches, sorted by name. No match is an Error naming `what`.
std::vector<std::filesystem::path> expand_glob(const std::string& pattern, const std::string& what);
// The same, empty when nothing matches.
std::vector<std::filesystem::path> glob_files(const std::string& pattern);

// Whether the file starts with the document (or preference) shard magic (nothing else is read
// or checked).
bool is_document_shard(const std::filesystem::path& path);

}  // namespace gpt2ft
