// GPU training checks (ctest label `gpu`, skipped without CUDA): float16 with the GradScaler
// and bfloat16 runs learn; fused AdamW equals the unfused update on CUDA.
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>
#include <torch/torch.h>

#include "gpt2ft/core/cuda_info.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/model/init.h"
#include "gpt2ft/train/adamw.h"
#include "gpt2ft/train/memory_planner.h"
#include "gpt2ft/train/trainer.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

class CudaTraining : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  }
};

TEST_F(CudaTraining, FusedAdamWEqualsUnfused) {
  torch::manual_seed(0);
  std::vector<std::pair<std::string, torch::Tensor>> a, b;
  for (int i = 0; i < 3; ++i) {
    const auto shape = i == 2 ? std::vector<int64_t>{17} : std::vector<int64_t>{33, 9};
    torch::Tensor p = torch::randn(shape, torch::kCUDA).requires_grad_(true);
    a.emplace_back("p" + std::to_string(i), p);
    b.emplace_back("p" + std::to_string(i), p.detach().clone().requires_grad_(true));
  }
  AdamW fused(a, {0.1, {0.9, 0.95}, 1e-8, true}), unfused(b, {0.1, {0.9, 0.95}, 1e-8, false});
  for (int step = 0; step < 5; ++step) {
    for (size_t i = 0; i < a.size(); ++i) {
      const torch::Tensor g = torch::randn_like(a[i].second);
      a[i].second.mutable_grad() = g.clone();
      b[i].second.mutable_grad() = g.clone();
    }
    fused.step(1e-2);
    unfused.step(1e-2);
  }
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, test::max_abs_diff(a[i].second, b[i].second));
  std::printf("[cuda] fused vs unfused AdamW after 5 steps: max|diff| %.3g\n", worst);
  EXPECT_LT(worst, 1e-6);
}

TEST_F(CudaTraining, Float16WithScalerAndBfloat16Learn) {
  test::TempDir tmp;
  GPT2Config c;
  c.n_layer = 2, c.n_head = 4, c.n_embd = 128, c.vocab_size = 512, c.n_positions = 128;
  GPT2 model(c);
  init_gpt2_weights(model, 1);
  save_model_folder(model, tmp.path() / "init");
  std::vector<uint32_t> tokens(60000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>((i * 7) % 61);
  write_shard(tmp.path() / "train_000000.bin", tokens, 2);
  for (const std::string dtype : {"float16", "bfloat16"}) {
    const nlohmann::json j = {
        {"model", {{"init_from", (tmp.path() / "init").string()}}},
        {"data", {{"train", (tmp.path() / "train_*.bin").string()}, {"seq_len", 128}}},
        {"train", {{"micro_batch_size", 8}, {"global_batch_size", 16}, {"max_steps", 60}, {"lr", 3e-3}}},
        {"amp", {{"dtype", dtype}}},
        {"log", {{"every_steps", 10}, {"progress", "lines"}}},
        {"output_dir", (tmp.path() / dtype).string()},
        {"device", "cuda"}};
    const TrainSummary s = run_training(TrainConfig::parse(j));
    std::printf("[cuda %s] loss %.4f -> %.4f in %.1fs\n", dtype.c_str(), s.first_loss, s.last_loss, s.seconds);
    EXPECT_LT(s.last_loss, 0.3 * s.first_loss) << dtype;
    std::ifstream metrics(tmp.path() / dtype / "metrics.jsonl");
    std::string line, last;
    while (std::getline(metrics, line)) last = line;
    const auto row = nlohmann::json::parse(last);
    EXPECT_EQ(row.contains("loss_scale"), dtype == "float16");
    EXPECT_GT(row["cuda_peak_allocated_gb"].get<double>(), 0);
  }
}

TEST_F(CudaTraining, PlannerPredictsThePeakWithinTenPercent) {
  test::TempDir tmp;
  std::vector<uint32_t> tokens(80 * 1025);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>((i * 2654435761u) % 50257);
  write_shard(tmp.path() / "train_000000.bin", tokens, 2);
  const c10::Device device(torch::kCUDA, 0);
  for (const std::string ckpt : {"none", "all"}) {
    for (int64_t micro : {1, 8, 32}) {
      const nlohmann::json j = {
          {"model", {{"preset", "gpt2"}, {"dropout", 0.0}, {"activation_checkpointing", ckpt}}},
          {"data", {{"train", (tmp.path() / "train_*.bin").string()}, {"seq_len", 1024}}},
          {"train", {{"micro_batch_size", micro}, {"global_batch_size", micro}, {"max_steps", 2}}},
          {"amp", {{"dtype", "bfloat16"}}},
          {"checkpoint", {{"resume", "none"}}},
          {"log", {{"every_steps", 1}, {"progress", "lines"}}},
          {"output_dir", (tmp.path() / (ckpt + std::to_string(micro))).string()},
          {"device", "cuda"}};
      const TrainConfig config = TrainConfig::parse(j);
      const MemoryPlan plan = plan_memory(memory_plan_input(config));
      cuda_empty_cache();
      cuda_reset_peak_memory(device);
      run_training(config);
      std::ifstream metrics(tmp.path() / (ckpt + std::to_string(micro)) / "metrics.jsonl");
      std::string line, last;
      while (std::getline(metrics, line)) {
        if (line.find("cuda_peak_allocated_gb") != std::string::npos) last = line;
      }
      const double measured = nlohmann::json::parse(last)["cuda_peak_allocated_gb"].get<double>() * 1e9;
      const double predicted = static_cast<double>(plan.peak(micro));
      std::printf("[planner] gpt2 T=1024 bf16 checkpointing %s micro %lld: predicted %.2f GB, measured %.2f GB (%+.1f%%)\n",
                  ckpt.c_str(), static_cast<long long>(micro), predicted / 1e9, measured / 1e9,
                  100 * (predicted - measured) / measured);
      EXPECT_LT(std::abs(predicted - measured) / measured, 0.10) << ckpt << " micro " << micro;
    }
  }
}

}  // namespace
}  // namespace gpt2ft
