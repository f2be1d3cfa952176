// The counting CPU allocator (memory/counting_allocator.h): exact live and peak bytes, phase
// peaks, the limit raising the error type CUDA's allocator raises, and nothing left alive
// after an out-of-memory error caught in the middle of a training step.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "gpt2ft/core/out_of_memory.h"
#include "gpt2ft/memory/counting_allocator.h"
#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/model/init.h"
#include "gpt2ft/optim/adamw.h"

namespace gpt2ft {
namespace {

class CountingAllocatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    install_counting_cpu_allocator();
    set_cpu_memory_limit(0);
  }
  void TearDown() override { set_cpu_memory_limit(0); }
};

TEST_F(CountingAllocatorTest, CountsLiveAndPeakBytesExactly) {
  ASSERT_TRUE(counting_cpu_allocator_installed());
  const int64_t before = cpu_memory_counts().live;
  reset_cpu_memory_peaks();
  {
    torch::Tensor a = torch::empty({1000}, torch::kFloat);   // 4000 bytes
    torch::Tensor b = torch::empty({250, 4}, torch::kDouble);  // 8000 bytes
    EXPECT_EQ(cpu_memory_counts().live - before, 12000);
    a.reset();
    EXPECT_EQ(cpu_memory_counts().live - before, 8000);
    EXPECT_EQ(cpu_memory_counts().peak - before, 12000);
  }
  EXPECT_EQ(cpu_memory_counts().live, before);
  reset_cpu_memory_peaks();
  EXPECT_EQ(cpu_memory_counts().peak, before);
  // Data is 64-byte aligned, as libtorch's own allocator gives it.
  torch::Tensor c = torch::empty({3}, torch::kByte);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(c.data_ptr()) % 64, 0u);
}

TEST_F(CountingAllocatorTest, PhasesKeepTheirOwnPeaks) {
  reset_cpu_memory_peaks();
  const int64_t base = cpu_memory_counts().live;
  {
    MemoryPhaseScope forward(MemoryPhase::kForward);
    torch::Tensor a = torch::empty({1 << 20}, torch::kByte);
    {
      MemoryPhaseScope loss(MemoryPhase::kLoss);
      torch::Tensor b = torch::empty({1 << 21}, torch::kByte);
    }
  }
  {
    MemoryPhaseScope optimizer(MemoryPhase::kOptimizer);
    torch::Tensor c = torch::empty({1 << 19}, torch::kByte);
  }
  const CpuMemoryCounts m = cpu_memory_counts();
  EXPECT_EQ(m.phase_peak[static_cast<size_t>(MemoryPhase::kForward)] - base, 1 << 20);
  EXPECT_EQ(m.phase_peak[static_cast<size_t>(MemoryPhase::kLoss)] - base, (1 << 20) + (1 << 21));
  EXPECT_EQ(m.phase_peak[static_cast<size_t>(MemoryPhase::kOptimizer)] - base, 1 << 19);
  EXPECT_EQ(m.peak - base, (1 << 20) + (1 << 21));
}

TEST_F(CountingAllocatorTest, TheLimitRaisesCudasErrorTypeAndChangesNothing) {
  const int64_t live = cpu_memory_counts().live;
  set_cpu_memory_limit(live + (1 << 20));
  torch::Tensor fits = torch::empty({1 << 18}, torch::kFloat);  // 1 MiB exactly
  try {
    torch::Tensor over = torch::empty({1}, torch::kFloat);
    FAIL() << "an allocation past cpu.memory_limit was allowed";
  } catch (const c10::OutOfMemoryError& e) {
    const std::string what = e.what_without_backtrace();
    EXPECT_NE(what.find("CPU out of memory (in other). Tried to allocate "), std::string::npos) << what;
    EXPECT_NE(what.find("cpu.memory_limit"), std::string::npos) << what;
    EXPECT_TRUE(is_out_of_memory(e));
  }
  EXPECT_EQ(cpu_memory_counts().live, live + (1 << 20));
  fits.reset();
  EXPECT_EQ(cpu_memory_counts().live, live);
}

// An error from whichever allocation crosses the limit, in forward, backward or the optimizer
// step: once the step's tensors are dropped (as the trainer drops them), the live bytes are
// what they were before the step, and the optimizer's step either happened whole or not at all.
TEST_F(CountingAllocatorTest, NothingStaysAliveAfterAnErrorAnywhereInTheStep) {
  GPT2Config c;
  c.n_layer = 2, c.n_head = 2, c.n_embd = 64, c.vocab_size = 211, c.n_positions = 64;
  c.resid_pdrop = c.embd_pdrop = c.attn_pdrop = 0.1;
  GPT2 model(c);
  init_gpt2_weights(model, 1);
  model->train();
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& p : model->named_parameters()) named.emplace_back(p.key(), p.value());
  AdamW opt(named, AdamWOptions{0.1, {0.9, 0.95}, 1e-8, false});
  const torch::Tensor x = torch::randint(211, {4, 64}), y = torch::randint(211, {4, 64});
  const auto step = [&] {
    torch::Tensor loss = model->forward_loss(x, y);
    loss.backward();
    opt.step(1e-3);
    for (auto& p : model->parameters()) p.mutable_grad().reset();
  };
  step();  // the optimizer's state exists from here on
  const int64_t before = cpu_memory_counts().live;
  reset_cpu_memory_peaks();
  step();
  const int64_t peak = cpu_memory_counts().peak - before;
  ASSERT_EQ(cpu_memory_counts().live, before);
  int errors = 0;
  for (int64_t cap = peak - 1; cap > 0; cap = cap * 3 / 4) {
    std::vector<torch::Tensor> weights;
    for (const auto& p : model->parameters()) weights.push_back(p.detach().clone());
    const int64_t start = cpu_memory_counts().live;
    set_cpu_memory_limit(start + cap);
    bool failed = false;
    try {
      step();
    } catch (const c10::OutOfMemoryError&) {
      failed = true;
    }
    set_cpu_memory_limit(0);
    for (auto& p : model->parameters()) p.mutable_grad().reset();
    errors += failed;
    EXPECT_EQ(cpu_memory_counts().live, start) << "cap " << cap << ": the failed step left tensors alive";
    if (failed) {  // every weight as before, or every weight stepped: never some of each
      size_t changed = 0;
      const auto params = model->parameters();
      for (size_t i = 0; i < params.size(); ++i) changed += !torch::equal(params[i], weights[i]);
      EXPECT_TRUE(changed == 0 || changed == params.size()) << "cap " << cap << ": " << changed << " of "
                                                            << params.size() << " tensors updated";
    }
  }
  EXPECT_GT(errors, 3);
}

}  // namespace
}  // namespace gpt2ft
