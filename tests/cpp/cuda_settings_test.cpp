// CUDA process settings. On every machine: the caching allocator's settings string keeps
// the user's keys (PyTorch's own parser reads it back). With a GPU (label `gpu`): the allocator
// calls work before any CUDA tensor exists, and one training step each way with expandable
// segments and page-locked host memory, reported.
#include <cstdio>
#include <fstream>

#include <c10/core/AllocatorConfig.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>
#include <torch/torch.h>

#include "gpt2ft/core/cuda_info.h"
#include "gpt2ft/core/pinned_buffers.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/model/init.h"
#include "gpt2ft/train/trainer.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

using Config = c10::CachingAllocator::AcceleratorAllocatorConfig;

TEST(CudaSettings, ExpandableSegmentsKeepTheUsersAllocatorSettings) {
  // Neither variable set: only ours.
  EXPECT_EQ(allocator_settings_with_expandable_segments(nullptr, nullptr), "expandable_segments:True");
  EXPECT_EQ(allocator_settings_with_expandable_segments(nullptr, " "), "expandable_segments:True");
  // The user's keys go in again: PyTorch resets every key the string does not name.
  const char* user = "max_split_size_mb:128,garbage_collection_threshold:0.8";
  const auto merged = allocator_settings_with_expandable_segments(nullptr, user);
  ASSERT_TRUE(merged);
  c10::CachingAllocator::setAllocatorSettings(user);  // what PyTorch read from the environment
  c10::CachingAllocator::setAllocatorSettings(*merged);
  EXPECT_EQ(Config::max_split_size(), size_t{128} << 20) << *merged;
  EXPECT_DOUBLE_EQ(Config::garbage_collection_threshold(), 0.8) << *merged;
  EXPECT_TRUE(Config::use_expandable_segments()) << *merged;
  // PYTORCH_ALLOC_CONF is read first; PYTORCH_CUDA_ALLOC_CONF only when it is unset.
  EXPECT_EQ(allocator_settings_with_expandable_segments("max_split_size_mb:64", "expandable_segments:False"),
            "max_split_size_mb:64,expandable_segments:True");
  // A user who names expandable_segments decides, in either variable.
  EXPECT_FALSE(allocator_settings_with_expandable_segments("expandable_segments:False", nullptr));
  EXPECT_FALSE(allocator_settings_with_expandable_segments(nullptr, "max_split_size_mb:128,expandable_segments:False"));
  EXPECT_FALSE(allocator_settings_with_expandable_segments("roundup_power2_divisions:[256:4,>:1], expandable_segments:True",
                                                           nullptr));
  const auto with_list = allocator_settings_with_expandable_segments("roundup_power2_divisions:[256:4,>:1]", nullptr);
  ASSERT_TRUE(with_list);
  c10::CachingAllocator::setAllocatorSettings(*with_list);
  EXPECT_EQ(Config::roundup_power2_divisions(size_t{300} << 20), 4u) << *with_list;
  EXPECT_TRUE(Config::use_expandable_segments()) << *with_list;
}

class CudaSetup : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  }
};

// Runs first in its own process (ctest entry gpu.setup): no CUDA tensor exists yet, so the
// caching allocator has not been initialised by anything but these calls.
TEST_F(CudaSetup, AllocatorCallsWorkBeforeTheFirstTensor) {
  const c10::Device cuda(c10::kCUDA, 0);
  const CudaMemory before = cuda_memory(cuda);  // plan on a CUDA config without --gpu-memory
  EXPECT_GT(before.total, int64_t{1} << 30);
  cuda_reset_peak_memory(cuda);
  configure_cuda(cuda, {true, false, before.total / 2});  // cuda.memory_limit: setMemoryFraction
  const torch::Tensor t = torch::ones({1 << 20}, torch::TensorOptions().device(cuda));
  EXPECT_EQ(t.sum().item<double>(), double(1 << 20));
  EXPECT_GE(cuda_memory(cuda).peak_allocated, int64_t{4} << 20);
  std::printf("[cuda setup] %s, %.1f GiB; allocator settings \"%s\"\n", cuda_device_name(cuda).c_str(),
              before.total / double(1ll << 30), c10::CachingAllocator::getAllocatorSettings().c_str());
}

// One short run each way: expandable segments off then on (the allocator reads the setting at
// each new segment), and optimizer offload's page-locked buffers; what the machine gave is
// printed, since a sandbox may refuse to lock memory.
TEST_F(CudaSetup, OneStepEachWayWithExpandableSegmentsAndPinnedMemory) {
  test::TempDir tmp;
  GPT2Config c;
  c.n_layer = 2, c.n_head = 4, c.n_embd = 128, c.vocab_size = 512, c.n_positions = 64;
  GPT2 model(c);
  init_gpt2_weights(model, 1);
  save_model_folder(model, tmp.path() / "init");
  std::vector<uint32_t> tokens(20000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>((i * 7) % 61);
  write_shard(tmp.path() / "train_000000.bin", tokens, 2);
  struct Way {
    bool expandable;
    std::string offload;
  };
  for (const Way& way : {Way{false, "none"}, Way{true, "none"}, Way{true, "cpu"}}) {
    const std::string name = std::string(way.expandable ? "expandable" : "plain") + "-" + way.offload;
    const nlohmann::json j = {
        {"model", {{"init_from", (tmp.path() / "init").string()}}},
        {"data", {{"train", (tmp.path() / "train_*.bin").string()}, {"seq_len", 64}}},
        {"train", {{"micro_batch_size", 4}, {"global_batch_size", 8}, {"max_steps", 2}, {"optimizer_offload", way.offload}}},
        {"cuda", {{"expandable_segments", way.expandable}}},
        {"checkpoint", {{"resume", "none"}, {"at_end", false}}},
        {"log", {{"every_steps", 1}, {"progress", "lines"}}},
        {"output_dir", (tmp.path() / name).string()},
        {"device", "cuda"}};
    const TrainSummary s = run_training(TrainConfig::parse(j));
    std::ifstream metrics(tmp.path() / name / "metrics.jsonl");
    std::string line, last;
    while (std::getline(metrics, line)) last = line;
    const auto row = nlohmann::json::parse(last);
    std::printf("[cuda setup] %s: loss %.4f -> %.4f, allocator expandable_segments %d, peak reserved %.3f GB\n",
                name.c_str(), s.first_loss, s.last_loss, static_cast<int>(Config::use_expandable_segments()),
                row["cuda_peak_reserved_gb"].get<double>());
    EXPECT_TRUE(std::isfinite(s.last_loss)) << name;
    if (!way.expandable && !std::getenv("PYTORCH_ALLOC_CONF") && !std::getenv("PYTORCH_CUDA_ALLOC_CONF")) {
      EXPECT_FALSE(Config::use_expandable_segments()) << "cuda.expandable_segments false left it off";
    }
    if (way.expandable) {
      EXPECT_TRUE(Config::use_expandable_segments()) << name;
    }
  }
  std::printf("[cuda setup] page-locked host buffers: %s\n",
              host_float_buffers({{1000}}, /*pin=*/true)[0].is_pinned() ? "granted" : "REFUSED (runs unpinned)");
}

}  // namespace
}  // namespace gpt2ft
