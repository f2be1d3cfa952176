// Token shard reading and writing.
#include "gpt2ft/data/shard.h"

#include <glob.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>

#include <c10/util/Exception.h>
#include <fmt/format.h>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/checksum.h"
#include "gpt2ft/core/error.h"

namespace gpt2ft {

int shard_token_bytes(int64_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

namespace {

size_t align4(size_t n) { return (n + 3) & ~size_t{3}; }

uint64_t header_checksum(const int32_t* header) {
  return static_cast<uint32_t>(header[5]) | (static_cast<uint64_t>(static_cast<uint32_t>(header[6])) << 32);
}

// What a document shard's checksum covers: version 1 the two sections; version 2 also the
// header's token count, token width and document count, so that a count changed by one (which
// the file size and alignment can absorb) is found.
uint64_t document_checksum(int32_t version, const int32_t* header, const uint8_t* sections, size_t bytes) {
  const uint64_t body = bytes_checksum(sections, bytes);
  if (version == 1) return body;
  return bytes_checksum(header + 2, 3 * sizeof(int32_t)) * 0x9E3779B97F4A7C15ull + body;
}

}  // namespace

ShardReader::ShardReader(const std::filesystem::path& path) : file_(path) {
  const std::string where = path.string();
  if (file_.size() < kShardHeaderBytes) {
    throw Error(where + ": not a token shard: " + std::to_string(file_.size()) +
                " bytes is shorter than the 1024-byte header");
  }
  int32_t header[7];
  std::memcpy(header, file_.data(), sizeof(header));
  if (header[0] == kShardMagicU16) {
    token_bytes_ = 2;
    if (header[1] != kShardVersionU16) {
      throw Error(where + ": shard version " + std::to_string(header[1]) + " with magic " +
                  std::to_string(kShardMagicU16) + " (expected version 1, uint16 tokens)");
    }
  } else if (header[0] == kShardMagicU32) {
    token_bytes_ = 4;
    if (header[1] != kShardVersionU32) {
      throw Error(where + ": shard version " + std::to_string(header[1]) + " with magic " +
                  std::to_string(kShardMagicU32) + " (expected version 7, uint32 tokens)");
    }
  } else if (header[0] == kShardMagicDocuments || header[0] == kShardMagicPreference) {
    open_documents(header);
    return;
  } else {
    throw Error(where + ": bad magic number " + std::to_string(header[0]) + " (expected " +
                std::to_string(kShardMagicU16) + ", " + std::to_string(kShardMagicU32) + ", " +
                std::to_string(kShardMagicDocuments) + " or " + std::to_string(kShardMagicPreference) +
                "); not a token shard, or corrupt");
  }
  if (header[2] < 0) throw Error(where + ": negative token count " + std::to_string(header[2]) + " in the header");
  num_tokens_ = header[2];
  const uint64_t expected = kShardHeaderBytes + static_cast<uint64_t>(num_tokens_) * token_bytes_;
  if (file_.size() != expected) {
    throw Error(where + ": the header says " + std::to_string(num_tokens_) + " tokens (" +
                std::to_string(expected) + " bytes) but the file has " + std::to_string(file_.size()) +
                " bytes; truncated or corrupt");
  }
}

void ShardReader::open_documents(const int32_t* header) {
  pairs_ = header[0] == kShardMagicPreference;
  const std::string where = path().string() + (pairs_ ? ": preference shard" : ": document shard");
  // A preference shard's checksum is version 2's (the header's counts included).
  const int32_t version = pairs_ ? (header[1] == kShardVersionPreference ? kShardVersionDocuments : -1) : header[1];
  if (version != kShardVersionDocuments && version != 1) {
    throw Error(where + " version " + std::to_string(header[1]) + " (expected " +
                std::to_string(pairs_ ? kShardVersionPreference : kShardVersionDocuments) +
                "); made by a newer gpt2-finetune, or corrupt");
  }
  if (header[3] != 2 && header[3] != 4) {
    throw Error(where + ": token width " + std::to_string(header[3]) + " bytes in the header (expected 2 or 4); corrupt");
  }
  if (header[2] < 0 || header[4] < 0 || (header[2] == 0) != (header[4] == 0) || header[4] > header[2]) {
    throw Error(where + ": " + std::to_string(header[2]) + " tokens and " + std::to_string(header[4]) +
                " documents in the header do not go together; corrupt");
  }
  token_bytes_ = header[3];
  num_tokens_ = header[2];
  num_documents_ = header[4];
  const size_t tokens_end = kShardHeaderBytes + static_cast<size_t>(num_tokens_) * token_bytes_;
  const size_t starts_at = align4(tokens_end);
  const size_t targets_at = starts_at + 4 * static_cast<size_t>(num_documents_);
  const size_t expected = targets_at + (static_cast<size_t>(num_tokens_) + 7) / 8;
  if (file_.size() != expected) {
    throw Error(where + ": the header says " + std::to_string(num_tokens_) + " tokens and " +
                std::to_string(num_documents_) + " documents (" + std::to_string(expected) +
                " bytes with the document and target sections) but the file has " + std::to_string(file_.size()) +
                " bytes; truncated or corrupt. Re-run tokenize");
  }
  starts_ = file_.data() + starts_at;
  targets_ = file_.data() + targets_at;
  if (document_checksum(version, header, starts_, expected - starts_at) != header_checksum(header)) {
    throw Error(where + ": the header's counts, the document starts or the target bits do not match the header's "
                        "checksum; the file is damaged. Re-run tokenize");
  }
  int64_t previous = -1;
  for (int64_t d = 0; d < num_documents_; ++d) {
    const int64_t s = document_start(d);
    if (s <= previous || s >= num_tokens_ || (d == 0 && s != 0)) {
      throw Error(where + ": document " + std::to_string(d) + " starts at token " + std::to_string(s) +
                  (d == 0 ? " (expected 0)" : " after " + std::to_string(previous)) + "; corrupt. Re-run tokenize");
    }
    previous = s;
  }
  if (pairs_) check_pairs(where);
}

int64_t ShardReader::prompt_length(int64_t d) const {
  const int64_t start = document_start(d), end = document_end(d);
  int64_t i = start;
  while (i < end && !is_target(i)) ++i;
  return i - start;
}

void ShardReader::check_pairs(const std::string& where) const {
  if (num_documents_ % 2 != 0) {
    throw Error(where + ": " + std::to_string(num_documents_) +
                " documents, an odd count; each example is a chosen and a rejected document. Corrupt: re-run tokenize");
  }
  for (int64_t d = 0; d < num_documents_; d += 2) {
    const int64_t p = prompt_length(d);
    const bool same_prompt = p == prompt_length(d + 1) && p > 0 &&
                             std::memcmp(file_.data() + kShardHeaderBytes + document_start(d) * token_bytes_,
                                         file_.data() + kShardHeaderBytes + document_start(d + 1) * token_bytes_,
                                         static_cast<size_t>(p * token_bytes_)) == 0;
    if (!same_prompt || p == document_end(d) - document_start(d) || p == document_end(d + 1) - document_start(d + 1)) {
      throw Error(fmt::format("{}: example {} (documents {} and {}) {}; corrupt. Re-run tokenize", where, d / 2, d,
                              d + 1,
                              same_prompt ? "has a continuation without a target token"
                                          : "does not start its chosen and rejected documents with one non-empty prompt"));
    }
  }
}

int64_t ShardReader::document_start(int64_t d) const {
  uint32_t v;
  std::memcpy(&v, starts_ + 4 * d, 4);
  return v;
}

int64_t ShardReader::document_end(int64_t d) const {
  return d + 1 < num_documents_ ? document_start(d + 1) : num_tokens_;
}

uint32_t ShardReader::token(int64_t i) const {
  const uint8_t* p = file_.data() + kShardHeaderBytes + i * token_bytes_;
  if (token_bytes_ == 2) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
  }
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

void ShardReader::read(int64_t begin, int64_t count, int64_t* out) const {
  TORCH_CHECK(begin >= 0 && count >= 0 && begin + count <= num_tokens_, "shard read out of range");
  const uint8_t* p = file_.data() + kShardHeaderBytes + begin * token_bytes_;
  if (token_bytes_ == 2) {
    const auto* t = reinterpret_cast<const uint16_t*>(p);
    for (int64_t i = 0; i < count; ++i) out[i] = t[i];
  } else {
    const auto* t = reinterpret_cast<const uint32_t*>(p);
    for (int64_t i = 0; i < count; ++i) out[i] = t[i];
  }
}

void ShardReader::check_ids(int64_t vocab_size) const {
  const uint8_t* p = file_.data() + kShardHeaderBytes;
  auto bad = [&](int64_t i, uint32_t id) {
    throw Error(path().string() + ": token id " + std::to_string(id) + " at position " + std::to_string(i) +
                " is outside the model's vocabulary of " + std::to_string(vocab_size) +
                "; were these shards made with another tokenizer?");
  };
  if (token_bytes_ == 2) {
    if (vocab_size > 0xFFFF) return;
    uint16_t max = 0;
    for (int64_t i = 0; i < num_tokens_; ++i) {  // a branch-free max first: the common case is clean
      uint16_t v;
      std::memcpy(&v, p + 2 * i, 2);
      max = std::max(max, v);
    }
    if (max < vocab_size) return;
    for (int64_t i = 0; i < num_tokens_; ++i) {
      if (token(i) >= vocab_size) bad(i, token(i));
    }
  } else {
    for (int64_t i = 0; i < num_tokens_; ++i) {
      if (token(i) >= static_cast<uint64_t>(vocab_size)) bad(i, token(i));
    }
  }
}

std::string describe_files(const std::vector<std::filesystem::path>& files) {
  std::string out;
  for (size_t i = 0; i < files.size() && i < 3; ++i) out += (i ? ", " : "") + files[i].string();
  if (files.size() > 3) out += " and " + std::to_string(files.size() - 3) + " more";
  return out;
}

namespace {

// `path`, once token_bytes is known to be a width the format has (before any file is made).
const std::filesystem::path& with_valid_width(const std::filesystem::path& path, int token_bytes) {
  if (token_bytes != 2 && token_bytes != 4) throw Error(path.string() + ": token width must be 2 or 4 bytes");
  return path;
}

}  // namespace

ShardWriter::ShardWriter(const std::filesystem::path& path, int token_bytes)
    : path_(path), token_bytes_(token_bytes), file_(with_valid_width(path, token_bytes)) {
  const int32_t header[kShardHeaderInts] = {};
  file_.write(header, sizeof(header));  // the counts are known at finish()
}

void ShardWriter::append(const uint32_t* ids, size_t count) {
  if (static_cast<uint64_t>(tokens_) + count > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
    throw Error(path_.string() + ": more than the format's limit of 2^31-1 tokens per shard; use smaller shards");
  }
  bytes_.resize(count * static_cast<size_t>(token_bytes_));
  if (token_bytes_ == 4) {
    std::memcpy(bytes_.data(), ids, bytes_.size());
  } else {
    uint32_t max = 0;
    for (size_t i = 0; i < count; ++i) {
      max = std::max(max, ids[i]);
      const uint16_t narrow = static_cast<uint16_t>(ids[i]);
      std::memcpy(bytes_.data() + 2 * i, &narrow, 2);
    }
    if (max > 0xFFFF) {
      const size_t i = static_cast<size_t>(std::find_if(ids, ids + count, [](uint32_t id) { return id > 0xFFFF; }) - ids);
      throw Error(path_.string() + ": token id " + std::to_string(ids[i]) + " at position " +
                  std::to_string(tokens_ + static_cast<int64_t>(i)) + " does not fit in uint16; write a uint32 shard");
    }
  }
  const uint64_t before = file_.size();
  file_.write(bytes_.data(), bytes_.size());
  tokens_ += static_cast<int64_t>(count);
  if ((before >> 23) != (file_.size() >> 23)) file_.start_writeback();  // every 8 MiB
}

void ShardWriter::finish(const ShardDocuments* documents) {
  int32_t header[kShardHeaderInts] = {};
  header[0] = token_bytes_ == 2 ? kShardMagicU16 : kShardMagicU32;
  header[1] = token_bytes_ == 2 ? kShardVersionU16 : kShardVersionU32;
  header[2] = static_cast<int32_t>(tokens_);
  if (documents) {
    const auto& starts = documents->starts;
    const auto n = static_cast<size_t>(tokens_);
    if (documents->targets.size() != n || (n == 0) != starts.empty() || (!starts.empty() && starts[0] != 0)) {
      throw Error(path_.string() + ": a document shard needs one target flag per token and documents from token 0");
    }
    for (size_t d = 1; d < starts.size(); ++d) {
      if (starts[d] <= starts[d - 1] || starts[d] >= n) {
        throw Error(path_.string() + ": document starts must increase and lie inside the tokens");
      }
    }
    if (documents->pairs && starts.size() % 2 != 0) {
      throw Error(path_.string() + ": a preference shard needs its documents in pairs (chosen, rejected)");
    }
    header[0] = documents->pairs ? kShardMagicPreference : kShardMagicDocuments;
    header[1] = documents->pairs ? kShardVersionPreference : kShardVersionDocuments;
    header[3] = token_bytes_;
    header[4] = static_cast<int32_t>(starts.size());
    const size_t body = n * static_cast<size_t>(token_bytes_);
    const uint8_t zeros[4] = {};
    file_.write(zeros, align4(body) - body);
    std::vector<uint8_t> sections(4 * starts.size() + (n + 7) / 8, 0);  // document starts and target bits
    std::memcpy(sections.data(), starts.data(), 4 * starts.size());
    uint8_t* bits = sections.data() + 4 * starts.size();
    for (size_t i = 0; i < n; ++i) {
      if (documents->targets[i]) bits[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
    }
    const uint64_t sum = document_checksum(kShardVersionDocuments, header, sections.data(), sections.size());
    header[5] = static_cast<int32_t>(static_cast<uint32_t>(sum));
    header[6] = static_cast<int32_t>(static_cast<uint32_t>(sum >> 32));
    file_.write(sections.data(), sections.size());
  }
  file_.write_at(0, header, sizeof(header));
  file_.commit();
}

void write_shard(const std::filesystem::path& path, const std::vector<uint32_t>& tokens,
                 int token_bytes, const ShardDocuments* documents) {
  ShardWriter writer(path, token_bytes);
  writer.append(tokens.data(), tokens.size());
  writer.finish(documents);
}

std::vector<std::filesystem::path> glob_files(const std::string& pattern) {
  glob_t g{};
  const int rc = ::glob(pattern.c_str(), GLOB_ERR, nullptr, &g);
  std::vector<std::filesystem::path> out;
  if (rc == 0) {
    for (size_t i = 0; i < g.gl_pathc; ++i) out.emplace_back(g.gl_pathv[i]);
  }
  ::globfree(&g);
  return out;  // glob() sorts its results
}

bool is_document_shard(const std::filesystem::path& path) {
  // Through the same checked open as every read: a FIFO or device is an error, not a hang.
  const MappedFile file(path);
  int32_t magic = 0;
  if (file.size() < sizeof(magic)) return false;
  std::memcpy(&magic, file.data(), sizeof(magic));
  return magic == kShardMagicDocuments || magic == kShardMagicPreference;
}

std::vector<std::filesystem::path> expand_glob(const std::string& pattern, const std::string& what) {
  std::vector<std::filesystem::path> out = glob_files(pattern);
  if (out.empty()) {
    throw Error(what + ": the pattern \"" + pattern + "\" matches no file");
  }
  return out;  // glob() sorts its results
}

}  // namespace gpt2ft
