// Training components against references: the GradScaler against torch.amp.GradScaler's
// recorded behaviour, activation checkpointing against plain backward, the config's errors.
#include <algorithm>
#include <fstream>
#include <limits>
#include <map>
#include <tuple>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "gpt2ft/core/error.h"
#include "gpt2ft/core/pinned_buffers.h"
#include "gpt2ft/io/tensorboard_events.h"
#include "gpt2ft/model/finetune.h"
#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/model/init.h"
#include "gpt2ft/optim/adamw.h"
#include "gpt2ft/optim/grad_clip.h"
#include "gpt2ft/optim/grad_scaler.h"
#include "gpt2ft/optim/offloaded_adamw.h"
#include "gpt2ft/train/config.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

using nlohmann::json;

TEST(GradScaler, SkipsAndScalesLikeTorchAmpGradScaler) {
  std::ifstream in(test::golden_dir() / "scaler.json");
  ASSERT_TRUE(in.good()) << "no scaler.json under GPT2FT_GOLDEN_DIR (run through ctest)";
  const json golden = json::parse(in);
  const json& o = golden["options"];
  GradScaler scaler(torch::kCPU, {o["init_scale"].get<double>(), o["growth_factor"].get<double>(),
                                  o["backoff_factor"].get<double>(), o["growth_interval"].get<int64_t>()});
  int step = 0, skipped = 0;
  for (const auto& s : golden["steps"]) {
    SCOPED_TRACE("step " + std::to_string(step++));
    EXPECT_EQ(scaler.scale_tensor().item<double>(), s["scale"].get<double>());
    std::vector<torch::Tensor> unscaled, grads;
    for (const auto& g : s["grads"]) {
      std::vector<float> values;
      for (const auto& v : g) values.push_back(v.is_number() ? v.get<float>() : std::stof(v.get<std::string>()));
      unscaled.push_back(torch::tensor(values));
      grads.push_back(unscaled.back() * scaler.scale_tensor());
    }
    scaler.unscale_(grads);
    const bool found_inf = scaler.found_inf().item<float>() != 0;
    EXPECT_EQ(found_inf, s["skipped"].get<bool>());
    if (!found_inf) {
      for (size_t i = 0; i < grads.size(); ++i) EXPECT_TRUE(torch::allclose(grads[i], unscaled[i], 1e-6, 1e-6));
    }
    skipped += found_inf;
    scaler.update();
    EXPECT_EQ(scaler.scale_tensor().item<double>(), s["scale_after"].get<double>());
  }
  EXPECT_GT(skipped, 0);
  EXPECT_EQ(scaler.skipped_steps().item<double>(), skipped);
}

// Gradients of every parameter after one forward/backward with the given checkpointing and
// freezing (a frozen parameter's entry is an undefined tensor).
std::map<std::string, torch::Tensor> gradients(int64_t checkpoint_every, bool freeze_embeddings = false,
                                               int64_t freeze_blocks = 0) {
  GPT2Config c;
  c.n_layer = 3, c.n_head = 2, c.n_embd = 32, c.vocab_size = 101, c.n_positions = 32;
  c.resid_pdrop = c.embd_pdrop = c.attn_pdrop = 0.1;
  GPT2 model(c);
  init_gpt2_weights(model, 3);
  model->train();
  model->set_activation_checkpointing(checkpoint_every);
  freeze(model, freeze_embeddings, freeze_blocks);
  torch::manual_seed(11);
  const torch::Tensor idx = torch::randint(0, 101, {4, 24});
  torch::manual_seed(12);  // the dropout masks
  next_token_loss(model->forward(idx.narrow(1, 0, 23)), idx.narrow(1, 1, 23)).backward();
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model->named_parameters()) {
    out[p.key()] = p.value().grad().defined() ? p.value().grad().clone() : torch::Tensor();
  }
  // The RNG must continue as without checkpointing: the recompute restores it.
  out["_next_random"] = torch::rand({4});
  return out;
}

TEST(ActivationCheckpointing, GradientsEqualPlainBackwardWithDropout) {
  const auto plain = gradients(0);
  for (int64_t every : {1, 2}) {
    const auto ckpt = gradients(every);
    ASSERT_EQ(ckpt.size(), plain.size());
    double worst = 0;
    for (const auto& [name, g] : plain) worst = std::max(worst, test::max_abs_diff(g, ckpt.at(name)));
    std::printf("[checkpointing] every %lld block(s), dropout 0.1: gradients max|diff| %.3g\n",
                static_cast<long long>(every), worst);
    EXPECT_EQ(worst, 0.0);
  }
}

// Freezing makes a checkpointed block's input need no gradient (frozen embeddings, frozen
// blocks before it); its parameters must get their gradients all the same.
TEST(ActivationCheckpointing, FrozenEmbeddingsAndBlocksStillTrainTheRest) {
  struct Freeze {
    bool embeddings;
    int64_t blocks;
  };
  for (const Freeze f : {Freeze{true, 0}, Freeze{false, 1}, Freeze{true, 1}, Freeze{true, 2}}) {
    const auto plain = gradients(0, f.embeddings, f.blocks);
    for (int64_t every : {1, 2}) {
      const auto ckpt = gradients(every, f.embeddings, f.blocks);
      double worst = 0;
      int64_t trained = 0;
      for (const auto& [name, g] : plain) {
        if (name == "_next_random") continue;
        SCOPED_TRACE(name + ", freeze embeddings " + std::to_string(f.embeddings) + " blocks " +
                     std::to_string(f.blocks) + ", checkpoint every " + std::to_string(every));
        ASSERT_EQ(g.defined(), ckpt.at(name).defined());
        if (!g.defined()) continue;
        ++trained;
        worst = std::max(worst, test::max_abs_diff(g, ckpt.at(name)));
      }
      std::printf("[checkpointing] freeze embeddings %d, blocks %lld, every %lld: %lld trained tensors, gradients "
                  "max|diff| %.3g\n",
                  f.embeddings, static_cast<long long>(f.blocks), static_cast<long long>(every),
                  static_cast<long long>(trained), worst);
      EXPECT_GT(trained, 0);
      EXPECT_EQ(worst, 0.0);
    }
  }
}

// torch.optim.AdamW skips a parameter whose .grad is None: no decay, no moment update, no
// step count. Feeding it zeros instead would still move it (decay and the old momentum).
TEST(AdamWTest, AParameterWithoutAGradientIsLeftAlone) {
  for (const bool fused : {false, true}) {
    SCOPED_TRACE(fused ? "fused" : "unfused");
    torch::manual_seed(0);
    const torch::Tensor a = torch::randn({5, 3}).requires_grad_(true), b = torch::randn({4, 2}).requires_grad_(true);
    AdamW opt({{"a", a}, {"b", b}}, {0.1, {0.9, 0.95}, 1e-8, fused});
    for (int step = 0; step < 3; ++step) {  // both train for a while: momentum builds up
      a.mutable_grad() = torch::randn_like(a);
      b.mutable_grad() = torch::randn_like(b);
      opt.step(1e-2);
    }
    const torch::Tensor b_before = b.detach().clone(), a_before = a.detach().clone();
    const auto& g = opt.groups()[0];
    const torch::Tensor b_m = g.exp_avg[1].clone(), b_v = g.exp_avg_sq[1].clone(), b_step = g.steps[1].clone();
    a.mutable_grad() = torch::randn_like(a);
    b.mutable_grad().reset();  // b took no part in this step
    opt.step(1e-2);
    EXPECT_TRUE(torch::equal(b, b_before));
    EXPECT_TRUE(torch::equal(g.exp_avg[1], b_m));
    EXPECT_TRUE(torch::equal(g.exp_avg_sq[1], b_v));
    EXPECT_EQ(g.steps[1].item<float>(), b_step.item<float>());
    EXPECT_EQ(g.steps[0].item<float>(), 4.0f);
    EXPECT_FALSE(torch::equal(a, a_before));
    // Its next step continues its own count: bias correction of step 4, as PyTorch's per-tensor state.
    a.mutable_grad().reset();
    b.mutable_grad() = torch::randn_like(b);
    opt.step(1e-2);
    EXPECT_EQ(g.steps[1].item<float>(), 4.0f);
    EXPECT_EQ(g.steps[0].item<float>(), 4.0f);
  }
}

// AdamW on the host, fed bucket by bucket, equals AdamW in place: every step, every parameter
// (one of them without a gradient in one step), the state it checkpoints, and a skipped step.
TEST(OffloadedAdamWTest, EqualsAdamWInPlaceBucketByBucket) {
  torch::manual_seed(0);
  std::vector<std::pair<std::string, torch::Tensor>> a, b;
  const std::vector<std::vector<int64_t>> shapes = {{7, 5}, {5}, {33, 4}, {3}, {2, 9}};
  for (size_t i = 0; i < shapes.size(); ++i) {
    const torch::Tensor p = torch::randn(shapes[i]);
    a.emplace_back("p" + std::to_string(i), p.clone().requires_grad_(true));
    b.emplace_back("p" + std::to_string(i), p.clone().requires_grad_(true));
  }
  AdamW plain(a, {0.1, {0.9, 0.95}, 1e-8, true});
  OffloadedAdamW offloaded(b, {0.1, {0.9, 0.95}, 1e-8, false}, c10::kCPU, /*bucket_bytes=*/64,  // many buckets
                           /*take_in_backward=*/false);
  for (int step = 0; step < 6; ++step) {
    for (size_t i = 0; i < a.size(); ++i) {
      const torch::Tensor g = torch::randn(shapes[i]);
      a[i].second.mutable_grad() = g.clone();
      b[i].second.mutable_grad() = g.clone();
      if (step == 3 && i == 2) a[i].second.mutable_grad().reset(), b[i].second.mutable_grad().reset();
    }
    const torch::Tensor skip = torch::full({}, step == 4 ? 1.0f : 0.0f);
    GradientScaling scaling;
    scaling.found_inf = skip;
    plain.step(1e-2, scaling);
    offloaded.step(1e-2, scaling);
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << "step " << step << " parameter " << i;
    }
  }
  const NamedTensors sa = plain.checkpoint_state(), sb = offloaded.checkpoint_state();
  std::map<std::string, torch::Tensor> by_key(sb.begin(), sb.end());
  ASSERT_EQ(sa.size(), sb.size());
  for (const auto& [key, t] : sa) EXPECT_TRUE(torch::equal(t, by_key.at(key))) << key;
  EXPECT_GT(offloaded.host_bytes(), 0);
}

// The host buffers behind the offload: exact shapes, one region each, alive while any
// tensor is (the block is freed with the last one).
TEST(OffloadedAdamWTest, HostBuffersAreSeparateAndOutliveTheirList) {
  torch::Tensor kept;
  {
    std::vector<torch::Tensor> block = host_float_buffers({{3}, {2, 5}, {7}}, /*pin=*/false);
    ASSERT_EQ(block.size(), 3u);
    EXPECT_EQ(block[1].sizes(), torch::IntArrayRef({2, 5}));
    for (size_t i = 0; i < block.size(); ++i) block[i].fill_(static_cast<float>(i));
    for (size_t i = 0; i < block.size(); ++i) EXPECT_TRUE(torch::all(block[i] == static_cast<float>(i)).item<bool>()) << i;
    EXPECT_EQ(block[1].data_ptr<float>(), block[0].data_ptr<float>() + 3);  // one allocation, back to back
    kept = block[2];
  }
  kept.add_(1);  // still valid memory (ASan would flag a use after free)
  EXPECT_TRUE(torch::all(kept == 3.0f).item<bool>());
}

// Overlapped offload: during the last backward of a step (never an earlier one) each bucket
// goes to the host once, right after backward finished its last gradient; a bucket with a
// parameter unused in that backward goes at step(), already unscaled and clipped. The
// weights and AdamW state equal AdamW in place bit for bit, through accumulation, a loss
// scale whose reciprocal rounds, clipping that bites, a skipped step and an abandoned
// backward (out of memory) that is done again.
TEST(OffloadedAdamWTest, TakesEachBucketOnceAsBackwardFinishesIt) {
  const std::vector<int64_t> widths = {6, 8, 5, 7, 4};  // w0 (6, 8), b0 (8), ..., w3 (7, 4), b3 (4)
  const test::NamedParams a = test::tanh_chain(5, widths), b = test::tanh_chain(5, widths);
  AdamW plain(a, {0.1, {0.9, 0.95}, 1e-8, true});
  OffloadedAdamW offloaded(b, {0.1, {0.9, 0.95}, 1e-8, true}, c10::kCPU, /*bucket_bytes=*/64,
                           /*take_in_backward=*/true);
  const std::vector<std::vector<std::string>> buckets = offloaded.bucket_names();
  ASSERT_GE(buckets.size(), 3u);
  std::vector<std::string> log;  // "grad <name>" as backward reaches a parameter; "sent <bucket> backward|step"
  for (const auto& [name, p] : b) p.register_hook([&log, name = name](const torch::Tensor&) { log.push_back("grad " + name); });
  offloaded.observe_transfers([&log](size_t i, bool during_backward) {
    log.push_back("sent " + std::to_string(i) + (during_backward ? " backward" : " step"));
  });
  const GradScalerOptions scale{3000.0, 2.0, 0.5, 2};  // 1/3000 rounds in float32; the scale moves
  GradScaler scaler_a(torch::kCPU, scale), scaler_b(torch::kCPU, scale);
  const auto find = [&log](const std::string& entry, size_t from = 0) {
    const auto it = std::find(log.begin() + static_cast<std::ptrdiff_t>(from), log.end(), entry);
    return it == log.end() ? std::string::npos : static_cast<size_t>(it - log.begin());
  };
  int skipped = 0;
  for (int step = 0; step < 6; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const std::string unused = step == 2 ? "b1" : "";  // not in the last micro batch
    const bool overflow = step == 4;
    torch::manual_seed(100 + step);
    const torch::Tensor x0 = torch::randn({3, 6}), x1 = torch::randn({3, 6});
    if (overflow) x1[0][0] = std::numeric_limits<float>::infinity();
    const auto micro_batch = [&](const torch::Tensor& x, const std::string& skip) {
      scaler_a.scale(test::tanh_chain_loss(a, x, skip)).backward();
      scaler_b.scale(test::tanh_chain_loss(b, x, skip)).backward();
    };
    if (step == 3) {  // a last backward that runs out of memory: abandoned, the step done again
      micro_batch(x0, "");
      offloaded.begin_last_backward();
      micro_batch(x1, "");
      offloaded.end_backward();
      clear_gradients(test::tensors_of(a));
      clear_gradients(test::tensors_of(b));
    }
    log.clear();
    log.push_back("backward 0");
    micro_batch(x0, "");
    offloaded.begin_last_backward();
    log.push_back("backward 1");
    micro_batch(x1, unused);
    offloaded.end_backward();
    log.push_back("end");
    GradientScaling sa, sb;  // the trainer's order: unscale, clip, step
    for (auto [named, scaler, s] : {std::tuple{&a, &scaler_a, &sa}, std::tuple{&b, &scaler_b, &sb}}) {
      const std::vector<torch::Tensor> grads = gradients_of(test::tensors_of(*named));
      scaler->unscale_(grads);
      s->found_inf = scaler->found_inf();
      s->inv_scale = scaler->inv_scale();
      s->clip_coef = clip_grad_norm_(grads, 0.05).coef;
    }
    ASSERT_EQ(sa.found_inf->item<float>() != 0, overflow);
    if (!overflow) {
      ASSERT_LT(sa.clip_coef->item<float>(), 0.5f);  // clipping bites
    }
    plain.step(1e-2, sa);
    offloaded.step(1e-2, sb);
    scaler_a.update();
    scaler_b.update();
    clear_gradients(test::tensors_of(a));
    clear_gradients(test::tensors_of(b));
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
    if (overflow) {
      ++skipped;
      EXPECT_EQ(find("sent 0 step"), std::string::npos) << "a skipped step sends nothing more";
      continue;
    }
    const size_t last_backward = find("backward 1"), end = find("end");
    for (size_t i = 0; i < buckets.size(); ++i) {
      SCOPED_TRACE("bucket " + std::to_string(i));
      const std::string prefix = "sent " + std::to_string(i) + " ";
      EXPECT_EQ(std::count_if(log.begin(), log.end(), [&](const std::string& e) { return e.rfind(prefix, 0) == 0; }), 1)
          << "sent once a step";
      if (std::find(buckets[i].begin(), buckets[i].end(), unused) != buckets[i].end()) {
        EXPECT_GT(find(prefix + "step"), end) << "its gradients were not all finished in backward";
        continue;
      }
      size_t finished = 0;  // where backward reached the bucket's last parameter
      for (const auto& name : buckets[i]) {
        const size_t at = find("grad " + name, last_backward);
        ASSERT_NE(at, std::string::npos) << name;
        finished = std::max(finished, at);
      }
      EXPECT_EQ(find(prefix + "backward"), finished + 1) << "sent right after backward finished it";
    }
  }
  EXPECT_EQ(skipped, 1);
  const NamedTensors sa = plain.checkpoint_state(), sb = offloaded.checkpoint_state();
  std::map<std::string, torch::Tensor> by_key(sb.begin(), sb.end());
  ASSERT_EQ(sa.size(), sb.size());
  for (const auto& [key, t] : sa) EXPECT_TRUE(torch::equal(t, by_key.at(key))) << key;
}

TEST(TrainConfigTest, BadConfigsNameThePathAndTheExpectation) {
  const json base = {{"model", {{"preset", "gpt2"}}}, {"data", {{"train", "x_*.bin"}}}, {"train", {{"max_steps", 10}}}};
  struct Case {
    json patch;
    std::vector<std::string> overrides;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {{{"train", {{"micro_batch_size", "eight"}}}}, {},
       "cfg.json: train.micro_batch_size: expected an integer in [1, 65536] or \"auto\", got \"eight\""},
      {{{"train", {{"micro_batch_size", 0}}}}, {}, "train.micro_batch_size: expected an integer in [1, 65536] or \"auto\", got 0"},
      {{{"train", {{"lr_schedule", "step"}}}}, {},
       "train.lr_schedule: expected one of \"constant\" \"linear\" \"cosine\", got \"step\""},
      {{{"train", {{"micro_batch_sise", 4}}}}, {}, "train.micro_batch_sise: unknown option"},
      {{{"trian", {{"lr", 1}}}}, {}, "trian.lr: unknown option"},
      {{{"train", {{"betas", {0.9}}}}}, {}, "train.betas: expected two numbers in [0, 0.999999], got [0.9]"},
      // In range before, yet AdamW's update is then NaN or infinite.
      {{{"train", {{"betas", {1, 1}}}}}, {}, "train.betas: expected two numbers in [0, 0.999999], got [1,1]"},
      {{{"train", {{"eps", 0}}}}, {}, "train.eps: expected a number in [1e-30, 1], got 0"},
      {{{"train", {{"weight_decay", 1e308}}}}, {}, "train.weight_decay: expected a number in [0, 10]"},
      {{{"train", {{"lr", 1e308}}}}, {}, "train.lr: expected a number in [0, 10]"},
      {{{"model", {{"lora", {{"alpha", 1e308}}}}}}, {}, "model.lora.alpha: expected a number in [0, 10000]"},
      {{{"distributed", {{"timeout_s", 1e308}}}}, {}, "distributed.timeout_s: expected a number in [1, 10000000]"},
      {{{"eval", {{"max_batches", 3}}}}, {}, "eval.max_batches was replaced by eval.max_sequences"},
      {{{"output_dir", "m"}, {"model", {{"preset", nullptr}, {"init_from", "m"}}}}, {}, "output_dir is the folder of model.init_from"},
      {{{"amp", {{"dtype", "fp8"}}}}, {}, "amp.dtype: expected one of \"auto\" \"none\" \"bfloat16\" \"float16\", got \"fp8\""},
      {{{"model", {{"dropout", 1.5}}}}, {}, "model.dropout: expected a number in [-1, 0.99], got 1.5"},
      {{{"model", {{"activation_checkpointing", "some"}}}}, {}, "model.activation_checkpointing: expected \"none\", \"all\", \"auto\" or an integer"},
      {{{"data", {{"seq_len", -4}}}}, {}, "data.seq_len: expected an integer in [1, 1048576], got -4"},
      {{{"train", {{"micro_batch_size", 3}, {"global_batch_size", 8}}}}, {}, "train.global_batch_size (8) is not divisible by train.micro_batch_size (3)"},
      {{{"model", {{"init_from", "m"}}}}, {}, "exactly one of model.init_from"},
      {{{"train", {{"max_steps", 0}}}}, {}, "train.max_steps or train.epochs"},
      {json::object(), {"train.lr=fast"}, "train.lr: expected a number in [0, 10], got \"fast\""},
      {json::object(), {"train.nope=1"}, "train.nope: unknown option"},
      {json::object(), {"novalue"}, "--set novalue: expected KEY=VALUE"},
      {{{"cuda", {{"memory_limit", "lots"}}}}, {}, "cfg.json: cuda.memory_limit: expected a size such as 80GiB"},
      // values that would run forever or abort in the allocator are out of range
      {{{"train", {{"global_batch_size", int64_t{1} << 62}}}}, {}, "train.global_batch_size: expected an integer in [0, 16777216]"},
      {{{"train", {{"micro_batch_size", 1000000000}}}}, {}, "train.micro_batch_size: expected an integer in [1, 65536]"},
      {{{"model", {{"resize_vocab", int64_t{1000000000000}}}}}, {}, "model.resize_vocab: expected an integer in [0, 16777216]"},
      // an object where a value belongs is a type error, not "use the default"
      {{{"train", {{"lr", json::object()}}}}, {}, "train.lr: expected a number in [0, 10], got {}"},
      {{{"distributed", {{"bucket_mb", json::object()}}}}, {}, "distributed.bucket_mb: expected a number"},
      {{{"device", json::object()}}, {}, "device: expected a string, got {}"},
      {{{"model", {{"lora", {{"targets", {"c_attn", 3}}}}}}}, {}, "model.lora.targets: expected a list of non-empty strings"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.patch.dump());
    json j = base;
    j.merge_patch(c.patch);
    test::expect_error_containing([&] { TrainConfig::parse(j, c.overrides, "cfg.json"); }, {c.expected});
  }
  // --set reaches every kind of option; the resolved config parses back to itself.
  const TrainConfig ok = TrainConfig::parse(base, {"train.micro_batch_size=4", "amp.dtype=bfloat16", "train.betas=[0.8,0.9]",
                                                   "model.activation_checkpointing=2", "data.shuffle=false"});
  EXPECT_EQ(ok.train.micro_batch_size, 4);
  EXPECT_EQ(ok.amp.dtype, "bfloat16");
  EXPECT_EQ(ok.train.betas[0], 0.8);
  EXPECT_EQ(ok.checkpoint_every_n_blocks(), 2);
  EXPECT_FALSE(ok.data.shuffle);
  EXPECT_EQ(TrainConfig::parse(ok.to_json()).to_json(), ok.to_json());
  EXPECT_NE(TrainConfig::help_text().find("train.micro_batch_size"), std::string::npos);
}

}  // namespace
}  // namespace gpt2ft

namespace gpt2ft {
namespace {

// CRC-32C's published check value, and the TFRecord framing of the first record written.
TEST(TensorBoardEvents, Crc32cAndRecordFraming) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  test::TempDir tmp;
  const std::filesystem::path file = TensorBoardWriter(tmp.path()).path();
  std::ifstream in(file, std::ios::binary);
  uint64_t length = 0;
  uint32_t length_crc = 0;
  in.read(reinterpret_cast<char*>(&length), 8);
  in.read(reinterpret_cast<char*>(&length_crc), 4);
  EXPECT_EQ(length_crc, masked_crc32c(&length, 8));
  std::string data(length, '\0');
  in.read(data.data(), static_cast<std::streamsize>(length));
  uint32_t data_crc = 0;
  in.read(reinterpret_cast<char*>(&data_crc), 4);
  EXPECT_TRUE(in.good());
  EXPECT_EQ(data_crc, masked_crc32c(data.data(), data.size()));
  EXPECT_NE(data.find("brain.Event:2"), std::string::npos);
}

}  // namespace
}  // namespace gpt2ft
