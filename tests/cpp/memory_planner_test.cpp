// The memory planner's fixed parts are exact: weights, gradients and optimizer state equal
// the bytes of the tensors the trainer creates, for tied and untied models and with freezing.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "gpt2ft/core/error.h"
#include "gpt2ft/distributed/optimizer_shards.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/memory/levers.h"
#include "gpt2ft/model/finetune.h"
#include "gpt2ft/model/init.h"
#include "gpt2ft/optim/adamw.h"
#include "gpt2ft/optim/adamw_8bit.h"
#include "gpt2ft/optim/offloaded_adamw.h"
#include "gpt2ft/train/checkpoint.h"
#include "gpt2ft/train/trainer.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

TEST(MemoryPlanner, FixedBytesEqualTheRealTensors) {
  struct Case {
    bool tied;
    bool freeze_embeddings;
    int64_t freeze_blocks;
  };
  for (const Case& k : {Case{true, false, 0}, Case{false, false, 0}, Case{true, true, 1}, Case{false, false, 2}}) {
    SCOPED_TRACE(::testing::Message() << "tied " << k.tied << " freeze_embeddings " << k.freeze_embeddings
                                      << " freeze_blocks " << k.freeze_blocks);
    test::TempDir tmp;
    GPT2Config c;
    c.n_layer = 3, c.n_head = 4, c.n_embd = 64, c.vocab_size = 300, c.n_positions = 48, c.n_inner = 200;
    c.tie_word_embeddings = k.tied;
    GPT2 model(c);
    init_gpt2_weights(model, 1);
    save_model_folder(model, tmp.path() / "m");
    const TrainConfig cfg = TrainConfig::parse(
        {{"model", {{"init_from", (tmp.path() / "m").string()}, {"freeze_embeddings", k.freeze_embeddings},
                    {"freeze_blocks", k.freeze_blocks}}},
         {"data", {{"train", "x"}, {"seq_len", 32}}},
         {"train", {{"max_steps", 1}}},
         {"amp", {{"dtype", "bfloat16"}}}});
    const MemoryPlan plan = plan_memory(memory_plan_input(cfg));

    freeze(model, k.freeze_embeddings, k.freeze_blocks);
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (const auto& p : model->named_parameters()) named.emplace_back(p.key(), p.value());
    AdamW optimizer(named, {});
    const torch::Tensor idx = torch::randint(0, 300, {2, 33});
    next_token_loss(model->forward(idx.narrow(1, 0, 32)), idx.narrow(1, 1, 32)).backward();
    int64_t weights = 0, grads = 0, state = 0;
    for (const auto& [name, p] : named) {
      weights += p.numel() * p.element_size();
      if (p.grad().defined()) grads += p.grad().numel() * p.grad().element_size();
    }
    for (const auto& g : optimizer.groups()) {
      for (size_t i = 0; i < g.params.size(); ++i) {
        state += g.exp_avg[i].nbytes() + g.exp_avg_sq[i].nbytes() + g.steps[i].nbytes();
      }
    }
    EXPECT_EQ(plan.weights, weights);
    EXPECT_EQ(plan.gradients, grads);
    EXPECT_EQ(plan.optimizer, state);
    EXPECT_GT(plan.activations_per_sequence, 0);

    // 8-bit AdamW: codes, scales and the float32 moments of small tensors, as it allocates them.
    // (64 x 300 = 19,200 and 64 x 200 are multiples of 256; the biases and LayerNorms are not.)
    // The embeddings keep float32 moments unless train.adamw_8bit.embeddings is "8bit".
    MemoryPlanInput eight_bit = memory_plan_input(cfg);
    eight_bit.optimizer_8bit = true;
    for (const bool quantize_embeddings : {true, false}) {
      AdamWOptions options;
      options.quantize_embeddings = eight_bit.quantize_embeddings = quantize_embeddings;
      int64_t state_8bit = 0;
      for (const auto& [name, t] : AdamW8bit(named, options).checkpoint_state()) state_8bit += t.nbytes();
      EXPECT_EQ(plan_memory(eight_bit).optimizer, state_8bit) << "quantize_embeddings " << quantize_embeddings;
      if (quantize_embeddings) EXPECT_LT(state_8bit, state / 3);
      else EXPECT_LT(state_8bit, state);
    }
    eight_bit.quantize_embeddings = false;
    // Offloaded, the host holds a float32 copy, the gradient buffer and the 8-bit state.
    eight_bit.optimizer_offload = true;
    const OffloadedAdamW host(named, {}, torch::kCPU, 1 << 20, /*take_in_backward=*/false, /*eight_bit=*/true);
    EXPECT_EQ(plan_memory(eight_bit).host_bytes, host.host_bytes());
    EXPECT_EQ(plan_memory(eight_bit).optimizer, 0);
  }
}

// Packed documents: the planner's extra bytes a sequence are the real mask and batch rows.
TEST(MemoryPlanner, PackedDocumentsCountTheirMaskAndRows) {
  for (const auto amp : {c10::kFloat, c10::kBFloat16}) {
    MemoryPlanInput in;
    in.model = GPT2Config::preset("gpt2");
    in.seq_len = 256;
    in.amp = amp;
    const MemoryPlan plain = plan_memory(in);
    in.packed_documents = true;
    const MemoryPlan packed = plan_memory(in);
    const int64_t T = in.seq_len;
    const torch::Tensor positions = torch::arange(T).remainder(100).unsqueeze(0);  // (1, T)
    const int64_t mask = static_cast<int64_t>(document_attention_mask(positions, amp).storage().nbytes());
    const int64_t rows = torch::empty({1, 3, T}, torch::kLong).nbytes() - torch::empty({1, T + 1}, torch::kLong).nbytes();
    EXPECT_EQ(packed.activations_per_sequence - plain.activations_per_sequence, mask + rows) << c10::toString(amp);
    EXPECT_EQ(packed.activations_per_sequence_all_checkpointed - plain.activations_per_sequence_all_checkpointed,
              mask + rows);
  }
}

TEST(MemoryPlanner, CheckpointingShrinksActivationsAndSizesParse) {
  MemoryPlanInput in;
  in.model = GPT2Config::preset("gpt2");
  in.amp = c10::kBFloat16;
  const MemoryPlan none = plan_memory(in);
  in.checkpoint_every = 1;
  const MemoryPlan all = plan_memory(in);
  EXPECT_LT(all.activations_per_sequence, none.activations_per_sequence / 3);
  EXPECT_EQ(all.activations_per_sequence, none.activations_per_sequence_all_checkpointed);
  EXPECT_GT(all.largest_micro_batch(80ll << 30), none.largest_micro_batch(80ll << 30));
  EXPECT_EQ(parse_memory_size("80GiB", "x"), 80ll << 30);
  EXPECT_EQ(parse_memory_size("24GB", "x"), 24000000000ll);
  test::expect_error_containing([] { parse_memory_size("80 parsecs", "--gpu-memory"); }, {"--gpu-memory", "parsecs"});
}

}  // namespace
}  // namespace gpt2ft

namespace gpt2ft {
namespace {

// gpt2-xl, full fine-tune, T=1024, bf16 on a 24 GiB GPU: micro batch 4 does not fit as it is;
// the levers plan recommends make it fit while keeping the full fine-tune, and every lever's
// figures are the planner's for the config with that lever's settings.
TEST(MemoryPlanner, LeversMakeGpt2XlFitA24GiBGpu) {
  const TrainConfig cfg = TrainConfig::parse({{"model", {{"preset", "gpt2-xl"}, {"dropout", 0.0}}},
                                              {"data", {{"train", "x"}, {"seq_len", 1024}}},
                                              {"train", {{"max_steps", 1}, {"micro_batch_size", 4}, {"global_batch_size", 32}}},
                                              {"amp", {{"dtype", "bfloat16"}}},
                                              {"device", "cuda"}});
  const int64_t budget = plannable_of(24ll << 30);
  ASSERT_LT(plan_memory(memory_plan_input(cfg)).largest_micro_batch(budget), 4);
  const MemoryAdvice advice = memory_levers(cfg, 1, 4, budget);
  ASSERT_FALSE(advice.single.empty());
  for (const auto& lever : advice.single) {
    const TrainConfig changed = TrainConfig::parse(cfg.to_json(), lever.settings);
    const int64_t micro = lever.micro_batch > 0 ? lever.micro_batch : 4;  // a smaller one, with accumulation
    EXPECT_EQ(lever.peak, plan_memory(memory_plan_input(changed, lever.world_size)).peak(micro)) << lever.name;
  }
  EXPECT_TRUE(advice.combined_fits);
  EXPECT_TRUE(advice.combined.keeps_full_fine_tune) << advice.combined.name;
  EXPECT_EQ(advice.combined.world_size, 1);
  EXPECT_GE(advice.combined.largest_micro_batch, 4);
  EXPECT_LE(advice.combined.peak, budget);
}

// The largest micro batch is not monotonic: gpt2-xl with checkpointing + offload at 16 GiB
// fits its whole batch of 16 (no gradients held between micro batches) but, accumulating,
// only a smaller micro batch; the two figures say which is which, each at the edge of fitting.
TEST(MemoryPlanner, TheWholeBatchCanFitWhereAnAccumulatingMicroBatchDoesNot) {
  const TrainConfig cfg = TrainConfig::parse({{"model", {{"preset", "gpt2-xl"}, {"activation_checkpointing", "all"}}},
                                              {"data", {{"train", "x"}, {"seq_len", 1024}}},
                                              {"train", {{"max_steps", 1}, {"micro_batch_size", 4}, {"global_batch_size", 16},
                                                         {"optimizer_offload", "cpu"}}},
                                              {"amp", {{"dtype", "bfloat16"}}},
                                              {"device", "cuda"}});
  const MemoryPlan plan = plan_memory(memory_plan_input(cfg));
  const int64_t budget = plannable_of(16ll << 30);
  const int64_t accumulating = plan.largest_accumulating_micro_batch(budget);
  EXPECT_EQ(plan.largest_micro_batch(budget), 16);
  EXPECT_LE(plan.peak(16), budget);
  ASSERT_GE(accumulating, 1);
  ASSERT_LT(accumulating + 1, 16);
  EXPECT_LE(plan.peak(accumulating), budget);
  EXPECT_GT(plan.peak(accumulating + 1), budget);
}

// A run already on several GPUs (ZeRO-1 over 2) has every lever judged on those GPUs, not on one.
TEST(MemoryPlanner, LeversOfAMultiGpuRunKeepItsGpus) {
  const TrainConfig cfg = TrainConfig::parse({{"model", {{"preset", "gpt2-xl"}, {"dropout", 0.0}}},
                                              {"data", {{"train", "x"}, {"seq_len", 1024}}},
                                              {"train", {{"max_steps", 1}, {"micro_batch_size", 4}, {"global_batch_size", 32}}},
                                              {"distributed", {{"shard_optimizer", true}}},
                                              {"amp", {{"dtype", "bfloat16"}}},
                                              {"device", "cuda"}});
  const int64_t budget = plannable_of(24ll << 30);
  const MemoryAdvice advice = memory_levers(cfg, 2, 4, budget);
  ASSERT_FALSE(advice.single.empty());
  for (const auto& lever : advice.single) {
    EXPECT_GE(lever.world_size, 2) << lever.name;
    const TrainConfig changed = TrainConfig::parse(cfg.to_json(), lever.settings);
    EXPECT_EQ(lever.peak, plan_memory(memory_plan_input(changed, lever.world_size)).peak(4)) << lever.name;
  }
  EXPECT_GE(advice.combined.world_size, 2);
}

// "auto" checkpointing takes the least recomputation that fits: the candidate before it does not.
TEST(MemoryPlanner, AutoCheckpointingIsTheLeastThatFits) {
  MemoryPlanInput in;
  in.model = GPT2Config::preset("gpt2-medium");
  in.amp = c10::kBFloat16;
  in.global_batch = 64;
  const int64_t budget = plannable_of(24ll << 30);
  in.checkpoint_every = 0;
  const int64_t none = plan_memory(in).largest_micro_batch(budget);
  const std::optional<int64_t> every = least_checkpointing_that_fits(in, none + 8, budget);
  ASSERT_TRUE(every.has_value());
  ASSERT_GT(*every, 0);
  in.checkpoint_every = *every;
  EXPECT_LE(plan_memory(in).peak(none + 8), budget);
  // One block fewer checkpointed no longer fits: every (N + 1)-th block covers fewer blocks.
  const int64_t L = in.model.n_layer;
  int64_t fewer = *every + 1;
  while (fewer <= L && (L + fewer - 1) / fewer == (L + *every - 1) / *every) ++fewer;
  in.checkpoint_every = fewer > L ? 0 : fewer;
  EXPECT_GT(plan_memory(in).peak(none + 8), budget);
  EXPECT_EQ(least_checkpointing_that_fits(in, none, budget), std::optional<int64_t>(0));
}

TEST(MemoryPlanner, ParameterShapesAreTheModels) {
  for (const bool tied : {true, false}) {
    GPT2Config c;
    c.n_layer = 2, c.n_head = 2, c.n_embd = 16, c.vocab_size = 50, c.n_positions = 8, c.n_inner = 40;
    c.tie_word_embeddings = tied;
    GPT2 model(c);
    const auto shapes = c.parameter_shapes();
    const auto named = model->named_parameters();
    ASSERT_EQ(shapes.size(), named.size()) << "tied " << tied;
    for (size_t i = 0; i < shapes.size(); ++i) {
      EXPECT_EQ(shapes[i].first, named[i].key());
      EXPECT_EQ(shapes[i].second, named[i].value().sizes().vec()) << shapes[i].first;
    }
  }
}

TEST(MemoryPlanner, ShardedOptimizerIsTheMostLoadedRanksRealState) {
  test::TempDir tmp;
  GPT2Config c;
  c.n_layer = 3, c.n_head = 4, c.n_embd = 64, c.vocab_size = 300, c.n_positions = 48;
  GPT2 model(c);
  save_model_folder(model, tmp.path() / "m");
  const TrainConfig cfg = TrainConfig::parse({{"model", {{"init_from", (tmp.path() / "m").string()}, {"freeze_blocks", 1}}},
                                              {"data", {{"train", "x"}, {"seq_len", 32}}},
                                              {"train", {{"max_steps", 1}}},
                                              {"distributed", {{"shard_optimizer", true}}}});
  freeze(model, false, 1);
  std::vector<std::pair<std::string, torch::Tensor>> trained;
  std::vector<int64_t> numels;
  for (const auto& p : model->named_parameters()) {
    if (p.value().requires_grad()) trained.emplace_back(p.key(), p.value()), numels.push_back(p.value().numel());
  }
  for (const int world : {2, 3, 5}) {
    MemoryPlanInput input = memory_plan_input(cfg);
    input.world_size = world;
    const std::vector<int> owner = partition_parameters(numels, world);
    int64_t most = 0;
    for (int r = 0; r < world; ++r) {
      std::vector<std::pair<std::string, torch::Tensor>> mine;
      for (size_t i = 0; i < trained.size(); ++i) {
        if (owner[i] == r) mine.push_back(trained[i]);
      }
      AdamW optimizer(mine, {});
      int64_t bytes = 0;
      for (const auto& [key, t] : adamw_state(optimizer)) bytes += t.nbytes();
      most = std::max(most, bytes);
    }
    EXPECT_EQ(plan_memory(input).optimizer, most) << world << " ranks";
    EXPECT_LT(most, plan_memory(memory_plan_input(cfg)).optimizer) << world << " ranks";
  }
}

}  // namespace
}  // namespace gpt2ft
