// GPU training checks (ctest label `gpu`, skipped without CUDA): float16 with the GradScaler
// and bfloat16 runs learn; fused AdamW equals the unfused update on CUDA; optimizer offload's
// copies during backward equal its copies at the step; DPO with each reference in bf16 and
// fp16 starts at loss log 2 with rewards 0, and its precomputed table equals the CPU's.
#include <cmath>
#include <fstream>
#include <random>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>
#include <torch/torch.h>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/core/cuda_info.h"
#include "gpt2ft/core/pinned_buffers.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/memory/planner.h"
#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/model/init.h"
#include "gpt2ft/optim/adamw.h"
#include "gpt2ft/optim/grad_clip.h"
#include "gpt2ft/optim/grad_scaler.h"
#include "gpt2ft/optim/offloaded_adamw.h"
#include "gpt2ft/train/preference_reference.h"
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
  // The two kernels round differently (an fp32 emulation of the fused one drifts 7.2e-7 from
  // the unfused ops after 5 steps on these values), so the bound is relative: 4e-6 of the
  // value (about 32 float32 units in the last place), with a floor near zero. A wrong update
  // (a missed bias correction, weight decay or epsilon) moves the weights by ~1e-2 of lr.
  double worst_abs = 0, worst_rel = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const torch::Tensor diff = (a[i].second - b[i].second).abs();
    worst_abs = std::max(worst_abs, diff.max().item<double>());
    worst_rel = std::max(worst_rel, (diff / (b[i].second.abs() + 1e-3)).max().item<double>());
  }
  std::printf("[cuda] fused vs unfused AdamW after 5 steps: max|diff| %.3g, max relative %.3g\n", worst_abs, worst_rel);
  EXPECT_LT(worst_rel, 4e-6);
}

// Gradients of one forward/backward of a small GPT-2 on `device` with dropout 0.1, checkpointing
// every `every` blocks, the dropout masks drawn from `seed`.
std::vector<torch::Tensor> dropout_gradients(c10::Device device, int64_t every, uint64_t seed) {
  GPT2Config c;
  c.n_layer = 3, c.n_head = 2, c.n_embd = 64, c.vocab_size = 101, c.n_positions = 64;
  c.resid_pdrop = c.embd_pdrop = c.attn_pdrop = 0.1;
  GPT2 model(c);
  init_gpt2_weights(model, 3);
  model->to(device);
  model->train();
  model->set_activation_checkpointing(every);
  torch::manual_seed(11);
  const torch::Tensor idx = torch::randint(0, 101, {4, 49}).to(device);
  torch::manual_seed(seed);  // the dropout masks, attention's (SDPA) among them
  next_token_loss(model->forward(idx.narrow(1, 0, 48)), idx.narrow(1, 1, 48)).backward();
  std::vector<torch::Tensor> out;
  for (const auto& p : model->parameters()) out.push_back(p.grad().cpu());
  out.push_back(torch::rand({4}, torch::TensorOptions().device(device)).cpu());  // the RNG continues as without
  return out;
}

// Checkpointing replays each block's forward in backward: on CUDA the replay must draw the same
// dropout masks (the CUDA generator's state is saved and restored around it, SDPA's attention
// dropout included). Not bitwise (attention backward may accumulate in another order), so the
// bound is set against the difference another set of masks makes.
TEST_F(CudaTraining, CheckpointingWithDropoutEqualsPlainBackward) {
  const c10::Device cuda(torch::kCUDA, 0);
  const auto plain = dropout_gradients(cuda, 0, 12);
  const auto other_masks = dropout_gradients(cuda, 0, 13);
  double masks_matter = 0;
  for (size_t i = 0; i + 1 < plain.size(); ++i) masks_matter = std::max(masks_matter, test::max_abs_diff(plain[i], other_masks[i]));
  for (const int64_t every : {1, 2}) {
    const auto ckpt = dropout_gradients(cuda, every, 12);
    double worst = 0;
    for (size_t i = 0; i < plain.size(); ++i) worst = std::max(worst, test::max_abs_diff(plain[i], ckpt[i]));
    std::printf("[cuda] checkpointing every %lld block(s), dropout 0.1: gradients max|diff| %.3g (other masks: %.3g)\n",
                static_cast<long long>(every), worst, masks_matter);
    EXPECT_LT(worst, 1e-5) << "every " << every;
    EXPECT_GT(masks_matter, 1000 * 1e-5) << "the bound tells masks apart";
  }
}

// Optimizer offload on CUDA, the trainer's sequence (accumulation, float16 autocast and loss
// scale, unscale, clip, step): buckets sent while backward runs, on the copy stream, give the
// same weights bit for bit as the same buckets sent at the step. A missing wait between the
// copy stream and the kernels that unscale, clip or free the gradients shows up here as a
// difference. Both stay within 1e-6 of AdamW on the GPU (another kernel, so not bitwise).
TEST_F(CudaTraining, OffloadDuringBackwardEqualsOffloadAtTheStep) {
  const c10::Device cuda(torch::kCUDA, 0);
  const std::vector<int64_t> widths = {1024, 2048, 2048, 2048, 1024};  // 12.6M parameters, 50 MB of gradients
  std::vector<test::NamedParams> params;
  for (int k = 0; k < 3; ++k) params.push_back(test::tanh_chain(9, widths, cuda));
  const AdamWOptions options{0.1, {0.9, 0.95}, 1e-8, true};
  AdamW in_place(params[0], options);
  OffloadedAdamW during(params[1], options, cuda, 4 << 20, /*take_in_backward=*/true);
  OffloadedAdamW at_step(params[2], options, cuda, 4 << 20, /*take_in_backward=*/false);
  const std::vector<Optimizer*> optimizers = {&in_place, &during, &at_step};
  int64_t sent_in_backward[2] = {0, 0}, sent_at_step[2] = {0, 0};  // during, at_step
  during.observe_transfers([&](size_t, bool in_backward) { ++(in_backward ? sent_in_backward : sent_at_step)[0]; });
  at_step.observe_transfers([&](size_t, bool in_backward) { ++(in_backward ? sent_in_backward : sent_at_step)[1]; });
  std::vector<GradScaler> scalers;
  for (int k = 0; k < 3; ++k) scalers.emplace_back(cuda, GradScalerOptions{3000.0, 2.0, 0.5, 2});
  for (int step = 0; step < 6; ++step) {
    torch::manual_seed(step);
    const torch::Tensor x = torch::randn({2, 256, widths[0]}, cuda);  // two micro batches
    for (int k = 0; k < 3; ++k) {
      for (int m = 0; m < 2; ++m) {
        if (m == 1) optimizers[k]->begin_last_backward();
        torch::Tensor loss;
        {
          AutocastGuard autocast(c10::kCUDA, c10::kHalf);
          loss = test::tanh_chain_loss(params[k], x[m]).to(torch::kFloat) / 2;
        }
        scalers[k].scale(loss).backward();
      }
      optimizers[k]->end_backward();
      const std::vector<torch::Tensor> grads = gradients_of(test::tensors_of(params[k]));
      GradientScaling scaling;
      scalers[k].unscale_(grads);
      scaling.found_inf = scalers[k].found_inf();
      scaling.inv_scale = scalers[k].inv_scale();
      scaling.clip_coef = clip_grad_norm_(grads, 0.005).coef;
      if (k == 0) {
        ASSERT_LT(scaling.clip_coef->item<float>(), 0.5f) << "clipping bites";
      }
      optimizers[k]->step(1e-3, scaling);
      scalers[k].update();
      clear_gradients(test::tensors_of(params[k]));
    }
  }
  torch::cuda::synchronize();
  double to_in_place = 0;
  for (size_t i = 0; i < params[0].size(); ++i) {
    EXPECT_TRUE(torch::equal(params[1][i].second, params[2][i].second)) << params[1][i].first;
    to_in_place = std::max(to_in_place, test::max_abs_diff(params[1][i].second, params[0][i].second));
  }
  std::printf("[cuda] offload, 6 steps: during backward vs at the step bitwise %s; vs AdamW on the GPU max|diff| %.3g\n%s\n",
              std::equal(params[1].begin(), params[1].end(), params[2].begin(),
                         [](const auto& a, const auto& b) { return torch::equal(a.second, b.second); })
                  ? "equal"
                  : "DIFFERENT",
              to_in_place, during.run_report().c_str());
  EXPECT_LT(to_in_place, 1e-6);
  // Without this the comparison above proves nothing: hooks that never fired send everything
  // at the step in both runs.
  std::printf("[cuda] offload bucket sends: during backward %lld in backward / %lld at the step; at the step %lld / %lld\n",
              static_cast<long long>(sent_in_backward[0]), static_cast<long long>(sent_at_step[0]),
              static_cast<long long>(sent_in_backward[1]), static_cast<long long>(sent_at_step[1]));
  EXPECT_GT(sent_in_backward[0], 6 * 3) << "several buckets a step go while backward runs";
  EXPECT_EQ(sent_at_step[0], 0);
  EXPECT_EQ(sent_in_backward[1], 0);
  EXPECT_GT(sent_at_step[1], 0);
  EXPECT_TRUE(host_float_buffers({{1000}}, /*pin=*/true)[0].is_pinned()) << "the offload's host buffers are page-locked";
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
          {"checkpoint", {{"resume", "none"}, {"at_end", false}}},  // no checkpoint: the peak is the step's
          {"log", {{"every_steps", 1}, {"progress", "lines"}}},
          {"output_dir", (tmp.path() / (ckpt + std::to_string(micro))).string()},
          {"save_dtype", "bfloat16"},  // final/ is always written: the smaller one
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
      std::filesystem::remove_all(tmp.path() / (ckpt + std::to_string(micro)));
    }
  }
}

// Preference pairs of random tokens (ids below 127; 127 is the end-of-text): prompts of 2-7
// tokens, continuations of 2-6, as tokenize writes them.
void write_pairs(const std::filesystem::path& path, int examples) {
  std::mt19937 rng(5);
  std::vector<uint32_t> tokens;
  ShardDocuments docs;
  docs.pairs = true;
  for (int k = 0; k < examples; ++k) {
    std::vector<uint32_t> prompt(2 + rng() % 6);
    for (auto& t : prompt) t = rng() % 127;
    for (int side = 0; side < 2; ++side) {
      docs.starts.push_back(static_cast<uint32_t>(tokens.size()));
      tokens.push_back(127);
      docs.targets.push_back(false);
      for (const uint32_t t : prompt) tokens.push_back(t), docs.targets.push_back(false);
      for (uint32_t i = 0, n = 2 + rng() % 5; i < n; ++i) tokens.push_back(rng() % 127), docs.targets.push_back(true);
      tokens.push_back(127);
      docs.targets.push_back(true);
    }
  }
  write_shard(path, tokens, 2, &docs);
}

std::vector<nlohmann::json> metric_rows(const std::filesystem::path& file) {
  std::ifstream in(file);
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(in, line);) {
    const auto row = nlohmann::json::parse(line);
    if (row.contains("loss")) rows.push_back(row);
  }
  return rows;
}

// DPO on CUDA with LoRA, each reference, under bf16 and fp16 autocast (fp16 with its loss
// scale): two steps, finite; at the first the policy is the initial model, so the loss is log 2
// and the rewards 0; the precomputed table equals the initial model's log-probs on the CPU in
// float32 within 16-bit rounding.
TEST_F(CudaTraining, DpoEachReferenceInBfloat16AndFloat16) {
  test::TempDir tmp;
  GPT2Config c;
  c.n_layer = 2, c.n_head = 2, c.n_embd = 64, c.vocab_size = 128, c.n_positions = 32;
  GPT2 init(c);
  init_gpt2_weights(init, 4);
  save_model_folder(init, tmp.path() / "init");
  write_pairs(tmp.path() / "train_000000.bin", 32);
  for (const std::string dtype : {"bfloat16", "float16"}) {
    for (const std::string reference : {"precomputed", "base", "model"}) {
      const auto out = tmp.path() / (dtype + "_" + reference);
      const nlohmann::json j = {
          {"model", {{"init_from", (tmp.path() / "init").string()}, {"lora", {{"rank", 4}, {"targets", {"c_attn"}}}}}},
          {"data", {{"train", (tmp.path() / "train_*.bin").string()}, {"seq_len", 24}}},
          {"train", {{"objective", "dpo"}, {"micro_batch_size", 4}, {"global_batch_size", 8}, {"max_steps", 2},
                     {"lr", 1e-2}}},
          {"dpo", {{"reference", reference}}},
          {"amp", {{"dtype", dtype}}},
          {"checkpoint", {{"at_end", false}}},
          {"log", {{"every_steps", 1}, {"progress", "lines"}}},
          {"output_dir", out.string()},
          {"device", "cuda"}};
      run_training(TrainConfig::parse(j));
      const auto rows = metric_rows(out / "metrics.jsonl");
      ASSERT_EQ(rows.size(), 2u) << dtype << " " << reference;
      const auto& first = rows[0];
      const double loss = first["loss"].get<double>(), chosen = first["rewards/chosen"].get<double>(),
                   rejected = first["rewards/rejected"].get<double>();
      std::printf("[cuda dpo] %s reference %s: step 1 loss %.6f (log 2 %.6f), rewards %.2g / %.2g; step 2 loss %.6f\n",
                  dtype.c_str(), reference.c_str(), loss, std::log(2.0), chosen, rejected, rows[1]["loss"].get<double>());
      // "base" and "model" run the policy's own shapes and kernels: equal to 16-bit rounding. The
      // precomputed table was scored in other batches (other GEMM shapes, other 16-bit rounding
      // of each logit): a few thousandths of a log-prob sum, times beta.
      const double tol = reference == "precomputed" ? 5e-3 : 1e-3;
      EXPECT_LT(std::abs(loss - std::log(2.0)), tol) << dtype << " " << reference;
      EXPECT_LT(std::abs(chosen), tol) << dtype << " " << reference;
      EXPECT_LT(std::abs(rejected), tol) << dtype << " " << reference;
      EXPECT_TRUE(std::isfinite(rows[1]["loss"].get<double>())) << dtype << " " << reference;
      if (reference != "precomputed") continue;
      const torch::Tensor table = SafetensorsReader(out / "reference_logps.safetensors").load("train", c10::kFloat);  // (S, 2)
      SampleOptions so;
      so.seq_len = 24;
      const Samples samples({tmp.path() / "train_000000.bin"}, so);
      std::vector<int64_t> ids(static_cast<size_t>(samples.size()));
      for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i);
      init->eval();
      const torch::Tensor cpu = reference_row_logprobs(init, pair_batch(samples, ids, torch::kCPU), true).view({-1, 2});
      const double worst = ((table - cpu).abs() / (cpu.abs() + 1)).max().item<double>();
      std::printf("[cuda dpo] %s precomputed table vs the CPU in float32: worst relative diff %.3g over %lld pairs\n",
                  dtype.c_str(), worst, static_cast<long long>(samples.size()));
      EXPECT_LT(worst, 2e-2) << dtype;
    }
  }
}

}  // namespace
}  // namespace gpt2ft
