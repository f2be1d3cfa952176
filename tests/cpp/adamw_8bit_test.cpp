// 8-bit AdamW against torchao 0.18 (make_adamw8bit_golden.py): the quantization maps, codes and
// scales exactly; 8 steps on a fixed gradient sequence; a skipped step; the checkpoint state
// round trip and its size.
#include <cmath>
#include <limits>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "gpt2ft/core/error.h"
#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/optim/adamw_8bit.h"
#include "gpt2ft/optim/blockwise_quantization.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

std::filesystem::path golden_file() { return test::golden_dir() / "adamw8bit.safetensors"; }

TEST(AdamW8bit, QuantizationEqualsTorchaoExactly) {
  ASSERT_TRUE(std::filesystem::exists(golden_file())) << golden_file() << " (run through ctest)";
  SafetensorsReader golden(golden_file());
  for (const bool is_signed : {true, false}) {
    const std::string kind = is_signed ? "signed" : "unsigned";
    const torch::Tensor map = dynamic_quantization_map(is_signed);
    EXPECT_TRUE(torch::equal(map, golden.load("map_" + kind))) << kind << " map";
    const torch::Tensor x = golden.load("input_" + kind);
    torch::Tensor codes = torch::empty({x.numel()}, torch::kByte), scales = torch::empty({x.numel() / 256});
    quantize_blockwise(x, map, 256, codes, scales);
    const torch::Tensor want = golden.load("codes_" + kind);
    EXPECT_TRUE(torch::equal(scales, golden.load("scales_" + kind))) << kind;
    EXPECT_EQ(codes.ne(want).sum().item<int64_t>(), 0) << kind << " codes differ from torchao's";
    // Dequantizing gives the map's value times the scale, and the nearest one.
    const torch::Tensor back = dequantize_blockwise(codes, scales, map);
    const torch::Tensor err = (back - x).abs().view({-1, 256}) / scales.unsqueeze(1);
    EXPECT_LE(err.max().item<double>(), 0.5 * (map.diff().max().item<double>()) + 1e-7);
  }
}

// The codes of nearest_codes (one searchsorted) against the rule written out value by value:
// the largest entry <= y (0 when none), then the nearer of it and the next, ties up. On the map's
// entries, their float32 neighbours, the midpoints between entries, +-0, +-1 and +-inf.
TEST(AdamW8bit, NearestCodesFollowTheRuleOnEveryEdge) {
  for (const bool is_signed : {true, false}) {
    const torch::Tensor map = dynamic_quantization_map(is_signed);
    const float* m = map.data_ptr<float>();
    std::vector<float> ys = {0.0f, -0.0f, 1.0f, -1.0f, std::numeric_limits<float>::infinity(),
                             -std::numeric_limits<float>::infinity(), 2.0f, -2.0f};
    for (int i = 0; i < 256; ++i) {
      for (const float e : {m[i], std::nextafter(m[i], -2.0f), std::nextafter(m[i], 2.0f)}) ys.push_back(e);
      if (i < 255) ys.push_back((m[i] + m[i + 1]) / 2);
    }
    const torch::Tensor y = torch::tensor(ys, torch::kFloat);
    const torch::Tensor got = nearest_codes(y, map);
    ASSERT_EQ(got.scalar_type(), torch::kInt);
    int64_t wrong = 0;
    for (size_t j = 0; j < ys.size(); ++j) {
      int down = 0;
      for (int i = 0; i < 256; ++i) {
        if (m[i] <= ys[j]) down = i;
      }
      const int up = std::min(down + 1, 255);
      const int want = (ys[j] - m[down]) >= (m[up] - m[down]) * 0.5f ? up : down;
      if (got[static_cast<int64_t>(j)].item<int>() != want) {
        ++wrong;
        ADD_FAILURE() << (is_signed ? "signed" : "unsigned") << " map: y=" << ys[j] << " gave code "
                      << got[static_cast<int64_t>(j)].item<int>() << ", want " << want;
        if (wrong > 5) break;
      }
    }
  }
}

TEST(AdamW8bit, EightStepsFollowTorchao) {
  ASSERT_TRUE(std::filesystem::exists(golden_file())) << golden_file() << " (run through ctest)";
  SafetensorsReader golden(golden_file());
  torch::Tensor big = golden.load("init_big").requires_grad_(true), small = golden.load("init_small").requires_grad_(true);
  AdamWOptions o;
  o.weight_decay = 0.1;
  o.betas = {0.9, 0.95};
  o.eps = 1e-8;
  AdamW8bit opt({{"big", big}, {"small", small}}, o, AdamW8bit::Kernel::kOps);  // the ATen ops, as torchao
  ASSERT_TRUE(opt.states()[0].quantized);
  ASSERT_FALSE(opt.states()[1].quantized);
  for (int step = 0; step < 8; ++step) {
    const std::string s = std::to_string(step);
    big.mutable_grad() = golden.load("grad_big_" + s);
    small.mutable_grad() = golden.load("grad_small_" + s);
    opt.step(1e-3);
    const auto& st = opt.states()[0];
    const int64_t code_diffs = st.exp_avg.ne(golden.load("exp_avg_codes_" + s)).sum().item<int64_t>() +
                               st.exp_avg_sq.ne(golden.load("exp_avg_sq_codes_" + s)).sum().item<int64_t>();
    const double big_diff = test::max_abs_diff(big, golden.load("big_" + s));
    const double small_diff = test::max_abs_diff(small, golden.load("small_" + s));
    const double weights = std::max(big_diff, small_diff);
    const double scales = std::max(test::max_abs_diff(st.exp_avg_scales, golden.load("exp_avg_scales_" + s)),
                                   test::max_abs_diff(st.exp_avg_sq_scales, golden.load("exp_avg_sq_scales_" + s)));
    std::printf("[adamw8bit] step %d: weights max|diff| %.3g (quantized %.3g, float32 state %.3g), scales %.3g, codes "
                "differing %lld of %lld\n",
                step + 1, weights, big_diff, small_diff, scales, static_cast<long long>(code_diffs), static_cast<long long>(2 * big.numel()));
    EXPECT_EQ(weights, 0.0) << "step " << step + 1;  // the same ops in the same order
    EXPECT_EQ(scales, 0.0) << "step " << step + 1;
    EXPECT_EQ(code_diffs, 0) << "step " << step + 1;
  }
}

// The fused CPU kernel against the op path (torchao's sequence) over 8 steps: weights within
// a few float32 ulps, and codes the same but for rare rounding ties.
TEST(AdamW8bit, FusedCpuKernelFollowsTheOps) {
  torch::manual_seed(5);
  const torch::Tensor w0 = torch::randn({96, 512}) * 0.02, b0 = torch::randn({300}) * 0.02;
  torch::Tensor wa = w0.clone().requires_grad_(true), ba = b0.clone().requires_grad_(true);
  torch::Tensor wb = w0.clone().requires_grad_(true), bb = b0.clone().requires_grad_(true);
  AdamW8bit ops({{"w", wa}, {"b", ba}}, AdamWOptions{}, AdamW8bit::Kernel::kOps);
  AdamW8bit fused({{"w", wb}, {"b", bb}}, AdamWOptions{});
  int64_t code_diffs = 0;
  double worst = 0;
  for (int step = 0; step < 8; ++step) {
    const torch::Tensor gw = torch::randn({96, 512}) * std::pow(10.0, step % 3 - 3), gb = torch::randn({300});
    wa.mutable_grad() = gw.clone(), ba.mutable_grad() = gb.clone();
    wb.mutable_grad() = gw.clone(), bb.mutable_grad() = gb.clone();
    ops.step(1e-3);
    fused.step(1e-3);
    code_diffs += ops.states()[0].exp_avg.ne(fused.states()[0].exp_avg).sum().item<int64_t>() +
                  ops.states()[0].exp_avg_sq.ne(fused.states()[0].exp_avg_sq).sum().item<int64_t>();
    worst = std::max({worst, test::max_abs_diff(wa, wb), test::max_abs_diff(ba, bb)});
  }
  std::printf("[adamw8bit] fused CPU kernel vs ops, 8 steps: weights max|diff| %.3g, codes differing %lld of %lld\n",
              worst, static_cast<long long>(code_diffs), static_cast<long long>(8 * 2 * wa.numel()));
  EXPECT_LT(worst, 1e-7);
  EXPECT_LT(code_diffs, 8 * 2 * wa.numel() / 1000);
}

TEST(AdamW8bit, SkippedStepChangesNothingAndStateRoundTrips) {
  torch::manual_seed(3);
  torch::Tensor w = (torch::randn({32, 256}) * 0.02).requires_grad_(true);
  torch::Tensor b = torch::zeros({256}).requires_grad_(true);
  AdamW8bit opt({{"w", w}, {"b", b}}, AdamWOptions{});
  for (int i = 0; i < 3; ++i) {
    w.mutable_grad() = torch::randn({32, 256});
    b.mutable_grad() = torch::randn({256});
    opt.step(1e-3);
  }
  const NamedTensors before = opt.checkpoint_state();
  std::vector<torch::Tensor> copies;
  for (const auto& [name, t] : before) copies.push_back(t.clone());
  const torch::Tensor w_before = w.detach().clone();
  GradientScaling skip;
  skip.found_inf = torch::ones({});
  opt.step(1e-3, skip);
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(torch::equal(before[i].second, copies[i])) << before[i].first;
  EXPECT_TRUE(torch::equal(w, w_before));

  // Saved and restored into a fresh optimizer: the next step is bitwise the same.
  test::TempDir tmp;
  save_safetensors(tmp.path() / "state.safetensors", before);
  torch::Tensor w2 = w.detach().clone().requires_grad_(true), b2 = b.detach().clone().requires_grad_(true);
  AdamW8bit other({{"w", w2}, {"b", b2}}, AdamWOptions{});
  other.restore_state(SafetensorsReader(tmp.path() / "state.safetensors"));
  const torch::Tensor gw = torch::randn({32, 256}), gb = torch::randn({256});
  w.mutable_grad() = gw.clone(), b.mutable_grad() = gb.clone();
  w2.mutable_grad() = gw.clone(), b2.mutable_grad() = gb.clone();
  opt.step(1e-3);
  other.step(1e-3);
  EXPECT_TRUE(torch::equal(w, w2));
  EXPECT_TRUE(torch::equal(b, b2));

  // The state is 2 bytes a value of w (plus a scale per block) and float32 for b.
  int64_t bytes = 0;
  for (const auto& [name, t] : opt.checkpoint_state()) bytes += t.nbytes();
  EXPECT_EQ(bytes, adamw_8bit_state_bytes("w", w.numel(), false) + adamw_8bit_state_bytes("b", b.numel(), false));
  EXPECT_EQ(adamw_8bit_state_bytes("w", w.numel(), false), 2 * 32 * 256 + 2 * 4 * 32 + 4);
  // An embedding keeps float32 moments unless train.adamw_8bit.embeddings is "8bit".
  EXPECT_EQ(adamw_8bit_state_bytes("transformer.wte.weight", w.numel(), false), 8 * w.numel() + 4);
  EXPECT_EQ(adamw_8bit_state_bytes("transformer.wte.weight", w.numel(), true), 2 * 32 * 256 + 2 * 4 * 32 + 4);
  // (AdamW's state is converted, not refused: StateConvertsBetweenAdamWAndEightBitOnResume.)
}

}  // namespace
}  // namespace gpt2ft

namespace gpt2ft {
namespace {

// Resuming after train.optimizer changed (an out-of-memory exit's advice): AdamW's float32
// moments quantized into 8-bit AdamW's blocks with torchao's rule (quantize_blockwise, checked
// against torchao above), 8-bit AdamW's dequantized into AdamW's, step counts carried; tensors
// that stay float32 under 8-bit AdamW copied as they are.
TEST(AdamW8bit, StateConvertsBetweenAdamWAndEightBitOnResume) {
  test::TempDir tmp;
  torch::manual_seed(5);
  const auto named = [](const torch::Tensor& w, const torch::Tensor& b) {
    return std::vector<std::pair<std::string, torch::Tensor>>{{"w", w}, {"b", b}};
  };
  torch::Tensor w = (torch::randn({32, 256}) * 0.02).requires_grad_(true), b = torch::randn({40}).requires_grad_(true);
  AdamW adamw(named(w, b), AdamWOptions{});
  for (int step = 0; step < 3; ++step) {
    w.mutable_grad() = torch::randn_like(w) * 1e-2, b.mutable_grad() = torch::randn_like(b) * 1e-2;
    adamw.step(1e-3);
  }
  save_safetensors(tmp.path() / "adamw.safetensors", adamw.checkpoint_state());
  AdamW8bit eight(named(w.detach().clone().requires_grad_(true), b.detach().clone().requires_grad_(true)), AdamWOptions{});
  eight.restore_state(SafetensorsReader(tmp.path() / "adamw.safetensors"));
  const SafetensorsReader saved(tmp.path() / "adamw.safetensors");
  const auto& q = eight.states()[0];
  ASSERT_TRUE(q.quantized);
  torch::Tensor codes = torch::empty({w.numel()}, torch::kByte), scales = torch::empty({w.numel() / 256});
  quantize_blockwise(saved.load("adamw.exp_avg.w").reshape({-1}), dynamic_quantization_map(true), 256, codes, scales);
  EXPECT_TRUE(torch::equal(q.exp_avg.reshape({-1}), codes));
  EXPECT_TRUE(torch::equal(q.exp_avg_scales, scales));
  quantize_blockwise(saved.load("adamw.exp_avg_sq.w").reshape({-1}), dynamic_quantization_map(false), 256, codes, scales);
  EXPECT_TRUE(torch::equal(q.exp_avg_sq.reshape({-1}), codes));
  EXPECT_EQ(q.step.item<float>(), 3.0f);
  const auto& kept = eight.states()[1];  // 40 values: float32 under 8-bit AdamW too
  ASSERT_FALSE(kept.quantized);
  EXPECT_TRUE(torch::equal(kept.exp_avg, saved.load("adamw.exp_avg.b")));

  // And back: AdamW takes 8-bit AdamW's moments dequantized.
  save_safetensors(tmp.path() / "eight.safetensors", eight.checkpoint_state());
  AdamW back(named(w.detach().clone().requires_grad_(true), b.detach().clone().requires_grad_(true)), AdamWOptions{});
  back.restore_state(SafetensorsReader(tmp.path() / "eight.safetensors"));
  const NamedTensors state = back.checkpoint_state();
  const auto find = [&](const std::string& key) {
    for (const auto& [k, t] : state) {
      if (k == key) return t;
    }
    ADD_FAILURE() << "no " << key;
    return torch::Tensor();
  };
  const torch::Tensor m = dequantize_blockwise(q.exp_avg.reshape({-1}), q.exp_avg_scales, dynamic_quantization_map(true));
  EXPECT_TRUE(torch::equal(find("adamw.exp_avg.w").reshape({-1}), m));
  EXPECT_TRUE(torch::equal(find("adamw.exp_avg.b"), saved.load("adamw.exp_avg.b")));
  EXPECT_EQ(find("adamw.step.w").item<float>(), 3.0f);
}

}  // namespace
}  // namespace gpt2ft
