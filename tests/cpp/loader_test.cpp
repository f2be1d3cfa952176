// The data loader: order independent of worker count, every sample once per epoch, exact
// continuation from a state with another micro batch, rank partitions, contents, errors.
#include <set>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "gpt2ft/core/error.h"
#include "gpt2ft/data/loader.h"
#include "gpt2ft/data/samples.h"
#include "gpt2ft/data/shard.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

constexpr int64_t kT = 16;

// Three shards whose token at position p of shard s is (s * 1000 + p) % 5000.
std::vector<std::filesystem::path> make_shards(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> paths;
  const size_t sizes[] = {500, 37, 1000};
  for (int s = 0; s < 3; ++s) {
    std::vector<uint32_t> tokens(sizes[s]);
    for (size_t p = 0; p < tokens.size(); ++p) tokens[p] = static_cast<uint32_t>((s * 1000 + p) % 5000);
    paths.push_back(dir / ("train_00000" + std::to_string(s) + ".bin"));
    write_shard(paths.back(), tokens, 2);
  }
  return paths;
}

LoaderOptions options(const std::vector<std::filesystem::path>& shards, int64_t B, int workers) {
  LoaderOptions o;
  o.shards = shards;
  o.seq_len = kT;
  o.micro_batch = B;
  o.seed = 42;
  o.num_workers = workers;
  return o;
}

// The samples of `calls` batches, flattened.
std::vector<int64_t> take(DataLoader& loader, int calls) {
  std::vector<int64_t> out;
  for (int i = 0; i < calls; ++i) {
    const Batch b = loader.next();
    out.insert(out.end(), b.samples.begin(), b.samples.end());
  }
  return out;
}

TEST(Loader, SameOrderForAnyWorkerCount) {
  test::TempDir tmp;
  const auto shards = make_shards(tmp.path());
  std::vector<std::vector<int64_t>> orders;
  std::vector<torch::Tensor> contents;
  for (int workers : {1, 2, 4}) {
    DataLoader loader(options(shards, 5, workers));
    std::vector<torch::Tensor> xs;
    std::vector<int64_t> samples;
    for (int i = 0; i < 50; ++i) {  // > 2 epochs of 93 samples
      const Batch b = loader.next();
      samples.insert(samples.end(), b.samples.begin(), b.samples.end());
      xs.push_back(torch::cat({b.x, b.y.narrow(1, kT - 1, 1)}, 1));
    }
    orders.push_back(samples);
    contents.push_back(torch::cat(xs));
  }
  EXPECT_EQ(orders[0], orders[1]);
  EXPECT_EQ(orders[0], orders[2]);
  EXPECT_TRUE(torch::equal(contents[0], contents[1]));
  EXPECT_TRUE(torch::equal(contents[0], contents[2]));
}

TEST(Loader, EverySampleOncePerEpochInAnOrderFixedBySeedAndEpoch) {
  test::TempDir tmp;
  const auto shards = make_shards(tmp.path());
  DataLoader loader(options(shards, 1, 2));
  const int64_t S = loader.samples_per_epoch();
  EXPECT_EQ(S, 499 / kT + 36 / kT + 999 / kT);  // per-shard windows, tails dropped
  const auto epoch0 = take(loader, static_cast<int>(S));
  const auto epoch1 = take(loader, static_cast<int>(S));
  EXPECT_EQ(loader.state(), (LoaderState{2, 0}));
  for (const auto* e : {&epoch0, &epoch1}) {
    std::set<int64_t> seen(e->begin(), e->end());
    EXPECT_EQ(seen.size(), static_cast<size_t>(S));
    EXPECT_EQ(*seen.begin(), 0);
    EXPECT_EQ(*seen.rbegin(), S - 1);
  }
  EXPECT_NE(epoch0, epoch1) << "each epoch must be reshuffled";
  auto o = options(shards, 1, 1);
  DataLoader same(o);
  EXPECT_EQ(take(same, static_cast<int>(S)), epoch0);
  o.seed = 43;
  DataLoader other(o);
  EXPECT_NE(take(other, static_cast<int>(S)), epoch0);
}

TEST(Loader, BatchesHoldTheSampleWindows) {
  test::TempDir tmp;
  const auto shards = make_shards(tmp.path());
  DataLoader loader(options(shards, 4, 2));
  std::vector<int64_t> first = {0, 499 / kT, 499 / kT + 36 / kT};  // first sample of each shard
  for (int i = 0; i < 10; ++i) {
    const Batch b = loader.next();
    ASSERT_EQ(b.x.sizes(), (std::vector<int64_t>{4, kT}));
    for (int r = 0; r < 4; ++r) {
      const int64_t s = b.samples[r];
      const int shard = s >= first[2] ? 2 : s >= first[1] ? 1 : 0;
      const int64_t begin = (s - first[shard]) * kT;
      for (int64_t j = 0; j < kT; ++j) {
        ASSERT_EQ(b.x[r][j].item<int64_t>(), (shard * 1000 + begin + j) % 5000);
        ASSERT_EQ(b.y[r][j].item<int64_t>(), (shard * 1000 + begin + j + 1) % 5000);
      }
    }
  }
}

TEST(Loader, ResumesFromAMidEpochStateExactly) {
  test::TempDir tmp;
  const auto shards = make_shards(tmp.path());
  DataLoader straight(options(shards, 6, 2));
  take(straight, 7);
  const LoaderState mid = straight.state();
  EXPECT_EQ(mid, (LoaderState{0, 42}));
  const auto rest = take(straight, 20);
  DataLoader resumed(options(shards, 6, 3), mid);
  EXPECT_EQ(take(resumed, 20), rest);
}

TEST(Loader, ASmallerMicroBatchContinuesAtTheSameSample) {
  test::TempDir tmp;
  const auto shards = make_shards(tmp.path());
  DataLoader reference(options(shards, 8, 2));
  const auto expected = take(reference, 30);  // crosses two epoch boundaries

  DataLoader loader(options(shards, 8, 2));
  auto got = take(loader, 3);
  loader.restart(loader.state(), 4);  // in-process back-off: halve the micro batch
  auto more = take(loader, 10);
  got.insert(got.end(), more.begin(), more.end());
  DataLoader fresh(options(shards, 2, 1), loader.state());  // a restart with micro batch 2
  more = take(fresh, 88);  // 3*8 + 10*4 + 88*2 = 30*8
  got.insert(got.end(), more.begin(), more.end());
  EXPECT_EQ(got, expected);
}

TEST(Loader, RanksPartitionTheSingleProcessOrder) {
  test::TempDir tmp;
  const auto shards = make_shards(tmp.path());
  const int W = 3, B = 4, steps = 20;
  DataLoader single(options(shards, W * B, 1));
  const auto expected = take(single, steps);
  std::vector<std::vector<int64_t>> per_rank;
  for (int r = 0; r < W; ++r) {
    auto o = options(shards, B, 2);
    o.rank = r;
    o.world_size = W;
    DataLoader loader(o);
    per_rank.push_back(take(loader, steps));
    EXPECT_EQ(loader.state(), single.state());
  }
  std::vector<int64_t> merged;
  for (int s = 0; s < steps; ++s) {
    for (int r = 0; r < W; ++r) merged.insert(merged.end(), per_rank[r].begin() + s * B, per_rank[r].begin() + (s + 1) * B);
  }
  EXPECT_EQ(merged, expected);
}

TEST(Loader, ErrorsNameTheShardWhenItIsOpened) {
  test::TempDir tmp;
  const auto shards = make_shards(tmp.path());
  auto o = options(shards, 4, 2);
  o.vocab_size = 1200;  // shard 2 holds ids up to 2999: refused when opened, not when a batch reaches them
  test::expect_error_containing([&] { DataLoader l(o); },
                                {"train_000002.bin", "token id", "at position", "outside the model's vocabulary of 1200"});
  o.vocab_size = 0;
  o.seq_len = 5000;
  test::expect_error_containing([&] { DataLoader l(o); }, {"train_000000.bin", "no complete sample", "5001"});
}

}  // namespace
}  // namespace gpt2ft

namespace gpt2ft {
namespace {

// Preference pairs: example k's prompt is {k, k} and its continuations {1000 + k} (chosen) and
// {2000 + k, 2000 + k} (rejected), each closed by 4999 (the end-of-text).
std::filesystem::path make_pairs(const std::filesystem::path& dir, int examples) {
  std::vector<uint32_t> tokens;
  ShardDocuments docs;
  docs.pairs = true;
  for (int k = 0; k < examples; ++k) {
    const std::vector<uint32_t> sides[2] = {{1000u + k}, {2000u + k, 2000u + k}};
    for (const auto& side : sides) {
      docs.starts.push_back(static_cast<uint32_t>(tokens.size()));
      for (const uint32_t t : {4999u, static_cast<uint32_t>(k), static_cast<uint32_t>(k)}) tokens.push_back(t), docs.targets.push_back(false);
      for (const uint32_t t : side) tokens.push_back(t), docs.targets.push_back(true);
      tokens.push_back(4999);
      docs.targets.push_back(true);
    }
  }
  const auto path = dir / "pairs.bin";
  write_shard(path, tokens, 2, &docs);
  return path;
}

TEST(Loader, PairsTravelWholeAsTwoRowsOnEveryRankAndMicroBatch) {
  test::TempDir tmp;
  const auto shard = make_pairs(tmp.path(), 40);
  const auto check = [](const Batch& b) {  // rows 2i and 2i+1 are example samples[i]'s chosen and rejected
    EXPECT_EQ(b.x.size(0), 2 * static_cast<int64_t>(b.samples.size()));
    for (size_t i = 0; i < b.samples.size(); ++i) {
      const int64_t k = b.samples[i];
      const auto chosen = b.x[2 * i], rejected = b.x[2 * i + 1];
      EXPECT_EQ(chosen[1].item<int64_t>(), k);
      EXPECT_EQ(chosen[3].item<int64_t>(), 1000 + k);
      EXPECT_EQ(rejected[4].item<int64_t>(), 2000 + k);
      EXPECT_EQ(b.y[2 * i][2].item<int64_t>(), 1000 + k);  // the first target: the continuation's first token
      EXPECT_EQ(b.y[2 * i][1].item<int64_t>(), kIgnoreTarget);
    }
  };
  auto o = options({shard}, 8, 2);
  DataLoader single(o);
  ASSERT_TRUE(single.holds_pairs());
  std::vector<int64_t> expected;
  for (int s = 0; s < 6; ++s) {
    const Batch b = single.next();
    check(b);
    EXPECT_EQ(b.num_targets, 2 * 8 + 3 * 8);  // chosen: 1 + end-of-text, rejected: 2 + end-of-text
    expected.insert(expected.end(), b.samples.begin(), b.samples.end());
  }
  // Two ranks of micro batch 2, two micro batches a step: the same examples, each whole.
  std::vector<int64_t> merged;
  std::vector<std::vector<int64_t>> per_rank(2);
  for (int r = 0; r < 2; ++r) {
    auto ro = options({shard}, 2, 1);
    ro.rank = r;
    ro.world_size = 2;
    DataLoader loader(ro);
    for (int call = 0; call < 12; ++call) {
      const Batch b = loader.next();
      check(b);
      per_rank[static_cast<size_t>(r)].insert(per_rank[static_cast<size_t>(r)].end(), b.samples.begin(), b.samples.end());
    }
  }
  for (int call = 0; call < 12; ++call) {
    for (int r = 0; r < 2; ++r) merged.insert(merged.end(), per_rank[r].begin() + 2 * call, per_rank[r].begin() + 2 * call + 2);
  }
  EXPECT_EQ(merged, expected);
}

}  // namespace
}  // namespace gpt2ft
