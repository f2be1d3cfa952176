// Token shard writer/reader round trips (uint16 and uint32) and validation.
#include <fstream>

#include <gtest/gtest.h>

#include "gpt2ft/core/error.h"
#include "gpt2ft/data/shard.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

std::vector<uint32_t> ramp(size_t n, uint32_t max_id) {
  std::vector<uint32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = static_cast<uint32_t>((i * 2654435761u) % (max_id + 1));
  t[n - 1] = max_id;
  return t;
}

TEST(Shard, RoundTripsBothTokenWidths) {
  test::TempDir tmp;
  for (const auto& [width, max_id] : {std::pair<int, uint32_t>{2, 65535}, {4, 100276}}) {
    const auto tokens = ramp(5000, max_id);
    const auto path = tmp.path() / ("s" + std::to_string(width) + ".bin");
    write_shard(path, tokens, width);
    EXPECT_EQ(std::filesystem::file_size(path), kShardHeaderBytes + tokens.size() * width);
    ShardReader r(path);
    EXPECT_EQ(r.token_bytes(), width);
    ASSERT_EQ(r.num_tokens(), static_cast<int64_t>(tokens.size()));
    std::vector<int64_t> back(tokens.size());
    r.read(0, r.num_tokens(), back.data());
    for (size_t i = 0; i < tokens.size(); ++i) ASSERT_EQ(back[i], tokens[i]) << "token " << i;
    EXPECT_EQ(r.token(17), tokens[17]);
  }
  EXPECT_EQ(shard_token_bytes(50257), 2);
  EXPECT_EQ(shard_token_bytes(65536), 2);
  EXPECT_EQ(shard_token_bytes(65537), 4);
}

TEST(Shard, HeaderFollowsTheLlmCFormat) {
  test::TempDir tmp;
  write_shard(tmp.path() / "a.bin", {1, 2, 3}, 2);
  std::ifstream in(tmp.path() / "a.bin", std::ios::binary);
  int32_t header[256];
  in.read(reinterpret_cast<char*>(header), sizeof(header));
  EXPECT_EQ(header[0], 20240520);
  EXPECT_EQ(header[1], 1);
  EXPECT_EQ(header[2], 3);
  for (int i = 3; i < 256; ++i) EXPECT_EQ(header[i], 0);
}

TEST(Shard, RejectsBadFilesWithTheReason) {
  test::TempDir tmp;
  const auto p = tmp.path() / "bad.bin";
  write_shard(p, {1, 2, 3, 4}, 2);
  std::filesystem::resize_file(p, std::filesystem::file_size(p) - 2);
  test::expect_error_containing([&] { ShardReader r(p); }, {p.string(), "header says 4 tokens", "truncated"});

  { std::ofstream(p, std::ios::binary) << std::string(2000, 'x'); }
  test::expect_error_containing([&] { ShardReader r(p); }, {p.string(), "bad magic"});

  { std::ofstream(p, std::ios::binary) << "short"; }
  test::expect_error_containing([&] { ShardReader r(p); }, {p.string(), "shorter than the 1024-byte header"});

  {
    int32_t header[256] = {20240520, 3, 0};
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(header), sizeof(header));
  }
  test::expect_error_containing([&] { ShardReader r(p); }, {"version 3", "expected version 1"});

  test::expect_error_containing([&] { write_shard(tmp.path() / "w.bin", {70000}, 2); },
                                {"70000", "does not fit in uint16"});
  EXPECT_FALSE(std::filesystem::exists(tmp.path() / "w.bin"));

  test::expect_error_containing([&] { expand_glob((tmp.path() / "nothing_*.bin").string(), "--data"); },
                                {"--data", "matches no file"});
}

}  // namespace
}  // namespace gpt2ft
