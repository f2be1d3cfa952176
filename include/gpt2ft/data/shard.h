// Token shards in llm.c's format: a header of 256 int32 (magic, version, token count, 0...)
// followed by the tokens, uint16 (magic 20240520, version 1) or, for vocabularies larger
// than 65,536, uint32 (magic 20240801, version 7).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "gpt2ft/core/mapped_file.h"

namespace gpt2ft {

inline constexpr int32_t kShardMagicU16 = 20240520;
inline constexpr int32_t kShardVersionU16 = 1;
inline constexpr int32_t kShardMagicU32 = 20240801;
inline constexpr int32_t kShardVersionU32 = 7;
inline constexpr size_t kShardHeaderInts = 256;
inline constexpr size_t kShardHeaderBytes = kShardHeaderInts * sizeof(int32_t);

// 2 when every id of a vocabulary fits in uint16, else 4.
int shard_token_bytes(int64_t vocab_size);

// A memory-mapped shard, validated on open (magic, version, size matching the header).
class ShardReader {
 public:
  explicit ShardReader(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return file_.path(); }
  int64_t num_tokens() const { return num_tokens_; }
  int token_bytes() const { return token_bytes_; }
  uint32_t token(int64_t i) const;
  // Copies tokens [begin, begin + count) into out as int64 (torch's index type).
  void read(int64_t begin, int64_t count, int64_t* out) const;
  // Every id below vocab_size, or an Error naming the file, the first bad id and its position.
  void check_ids(int64_t vocab_size) const;

 private:
  MappedFile file_;
  int64_t num_tokens_ = 0;
  int token_bytes_ = 2;
};

// Writes a shard atomically. token_bytes 2 or 4; ids must fit.
void write_shard(const std::filesystem::path& path, const std::vector<uint32_t>& tokens,
                 int token_bytes);

// "a.bin, b.bin and 3 more": files for a message.
std::string describe_files(const std::vector<std::filesystem::path>& files);

// The files a glob pattern matches, sorted by name. No match is an Error naming `what`.
std::vector<std::filesystem::path> expand_glob(const std::string& pattern, const std::string& what);

}  // namespace gpt2ft
