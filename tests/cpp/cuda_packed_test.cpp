// GPU checks of what was added for instruction data and 8-bit AdamW (ctest label `gpu`,
// skipped without CUDA): packed documents on CUDA against the CPU (fp32 and bf16 autocast, T=64
// and T=72, with checkpointing and dropout), the varlen path against the mask path, the
// cuDNN masked-backward pattern of PyTorch issue 196678 against our path, 8-bit AdamW's steps
// against the CPU with a skipped step and a checkpoint round trip, and evaluation of document
// shards. Each prints the kernel SDPA picked, so the GPU run reports it.
#include <functional>
#include <limits>
#include <random>

#include <ATen/Context.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/data/samples.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/eval/evaluate.h"
#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/model/init.h"
#include "gpt2ft/model/packed_attention.h"
#include "gpt2ft/optim/adamw_8bit.h"
#include "gpt2ft/optim/adamw_8bit_cuda.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

class CudaPacked : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  }
};

GPT2Config small_config(double dropout) {
  GPT2Config c;
  c.n_layer = 2, c.n_head = 2, c.n_embd = 64, c.vocab_size = 101, c.n_positions = 128;
  c.resid_pdrop = c.embd_pdrop = c.attn_pdrop = dropout;
  return c;
}

// A packed batch (B=3, 3, T): x, y (targets on about half the positions, -100 elsewhere) and
// positions of documents of 1..T/2 tokens with padding (each padding token a document of one)
// at the end of each row, as data/samples.h lays them out.
torch::Tensor packed_batch(int64_t T, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  torch::Tensor t = torch::zeros({3, 3, T}, torch::kLong);
  for (int64_t b = 0; b < 3; ++b) {
    int64_t at = 0;
    while (at < T - 5) {
      const int64_t len = std::min<int64_t>(T - 5 - at, 1 + static_cast<int64_t>(rng() % (T / 2)));
      for (int64_t i = 0; i < len; ++i) {
        t[b][0][at + i] = static_cast<int64_t>(rng() % 100);
        t[b][1][at + i] = rng() % 2 ? static_cast<int64_t>(rng() % 100) : kIgnoreTarget;
        t[b][2][at + i] = i;
      }
      at += len;
    }
    for (int64_t i = at; i < T; ++i) t[b][1][i] = kIgnoreTarget;  // padding: x 0, position 0, no target
  }
  return t;
}

struct LossAndGrads {
  torch::Tensor loss;
  std::vector<torch::Tensor> grads;  // on the CPU, float32
};

// With host_bounds, the sequences are found on the host as the loader does
// (packed_sequence_bounds: a row's trailing padding one sequence) instead of on the device.
LossAndGrads packed_step(GPT2& model, const torch::Tensor& batch, c10::Device device, c10::ScalarType amp,
                         bool host_bounds = false) {
  const torch::Tensor b = batch.to(device);
  SequenceBounds bounds;
  if (host_bounds) {
    const torch::Tensor host = batch.contiguous();  // (B, 3, T)
    const int64_t B = host.size(0), T = host.size(2);
    torch::Tensor starts = torch::empty({B * T + 1}, torch::kInt);
    const int64_t D = packed_sequence_bounds(host.data_ptr<int64_t>() + 2 * T, host.data_ptr<int64_t>() + T, B, T,
                                             3 * T, starts.data_ptr<int32_t>(), bounds.max_len);
    bounds.cu_seqlens = starts.narrow(0, 0, D + 1).to(device);
  }
  model->zero_grad();
  torch::Tensor loss;
  {
    AutocastGuard autocast(device.type(), amp);
    loss = next_token_loss(model->forward(b.select(1, 0), b.select(1, 2), bounds), b.select(1, 1));
  }
  loss.backward();
  LossAndGrads out{loss.detach().cpu(), {}};
  for (const auto& p : model->parameters()) out.grads.push_back(p.grad().to(torch::kCPU, torch::kFloat));
  return out;
}

// max |a - b| / (max |b| + 1e-6) over the loss and every gradient.
double worst_relative(const LossAndGrads& a, const LossAndGrads& b) {
  double worst = test::max_abs_diff(a.loss, b.loss) / (b.loss.abs().item<double>() + 1e-6);
  for (size_t i = 0; i < a.grads.size(); ++i) {
    worst = std::max(worst, test::max_abs_diff(a.grads[i], b.grads[i]) / (b.grads[i].abs().max().item<double>() + 1e-6));
  }
  return worst;
}

bool all_finite(const LossAndGrads& r) {
  bool ok = torch::isfinite(r.loss).all().item<bool>();
  for (const auto& g : r.grads) ok = ok && torch::isfinite(g).all().item<bool>();
  return ok;
}

TEST_F(CudaPacked, DocumentsMatchTheCpuInFloat32AndBfloat16) {
  const c10::Device cuda(torch::kCUDA);
  for (const int64_t T : {64, 72}) {
    const torch::Tensor batch = packed_batch(T, static_cast<uint64_t>(T));
    GPT2 cpu_model(small_config(0.0));
    init_gpt2_weights(cpu_model, 7);
    cpu_model->train();
    const LossAndGrads reference = packed_step(cpu_model, batch, torch::kCPU, c10::kFloat);
    for (const auto amp : {c10::kFloat, c10::kBFloat16}) {
      for (const int64_t every : {0, 1}) {
        GPT2 model(small_config(0.0));
        init_gpt2_weights(model, 7);
        model->to(cuda);
        model->train();
        model->set_activation_checkpointing(every);
        const LossAndGrads got = packed_step(model, batch, cuda, amp);
        const double worst = worst_relative(got, reference);
        std::printf("[cuda packed] T=%lld %s checkpointing %s: loss %.6f (cpu %.6f), worst relative diff %.3g; %s\n",
                    static_cast<long long>(T), c10::toString(amp), every ? "all" : "none", got.loss.item<double>(),
                    reference.loss.item<double>(), worst,
                    describe_attention_kernels(model->config(), cuda, amp, T, 0.0, PackedAttention::kMask).c_str());
        EXPECT_TRUE(all_finite(got)) << "T=" << T << " " << c10::toString(amp);
        EXPECT_LT(worst, amp == c10::kFloat ? 2e-5 : 3e-2) << "T=" << T << " " << c10::toString(amp);
      }
    }
    // With dropout: checkpointing recomputes the same masks on CUDA.
    for (const auto amp : {c10::kFloat, c10::kBFloat16}) {
      std::vector<LossAndGrads> runs;
      for (const int64_t every : {0, 1}) {
        GPT2 model(small_config(0.1));
        init_gpt2_weights(model, 7);
        model->to(cuda);
        model->train();
        model->set_activation_checkpointing(every);
        torch::manual_seed(21);
        runs.push_back(packed_step(model, batch, cuda, amp));
      }
      const double worst = worst_relative(runs[1], runs[0]);
      std::printf("[cuda packed] T=%lld %s dropout 0.1, checkpointing vs none: worst relative diff %.3g\n",
                  static_cast<long long>(T), c10::toString(amp), worst);
      EXPECT_TRUE(all_finite(runs[0]) && all_finite(runs[1]));
      EXPECT_LT(worst, amp == c10::kFloat ? 1e-5 : 1e-2);
    }
  }
}

TEST_F(CudaPacked, VarlenFlashAttentionEqualsTheMask) {
  const c10::Device cuda(torch::kCUDA);
  for (const int64_t T : {64, 72}) {
    const torch::Tensor batch = packed_batch(T, 100 + static_cast<uint64_t>(T));
    std::vector<LossAndGrads> runs;
    for (const auto how : {PackedAttention::kMask, PackedAttention::kVarlen}) {
      GPT2 model(small_config(0.0));
      init_gpt2_weights(model, 9);
      model->to(cuda);
      model->train();
      model->set_packed_attention(how);
      model->set_activation_checkpointing(1);
      runs.push_back(packed_step(model, batch, cuda, c10::kBFloat16));
    }
    {  // varlen with the loader's host-side sequences (trailing padding merged): no sync in forward
      GPT2 model(small_config(0.0));
      init_gpt2_weights(model, 9);
      model->to(cuda);
      model->train();
      model->set_packed_attention(PackedAttention::kVarlen);
      model->set_activation_checkpointing(1);
      runs.push_back(packed_step(model, batch, cuda, c10::kBFloat16, /*host_bounds=*/true));
    }
    const double worst = worst_relative(runs[1], runs[0]), host = worst_relative(runs[2], runs[0]);
    std::printf("[cuda packed] T=%lld bf16 varlen vs mask: loss %.6f vs %.6f, worst relative diff %.3g; with the "
                "host's sequences %.3g\n",
                static_cast<long long>(T), runs[1].loss.item<double>(), runs[0].loss.item<double>(), worst, host);
    EXPECT_TRUE(all_finite(runs[1]) && all_finite(runs[2]));
    EXPECT_LT(worst, 3e-2);
    EXPECT_LT(host, 3e-2);
  }
}

// PyTorch issue 196678's pattern with our mask: T % 128 == 64 (704) and a control (1024), rows
// whose only allowed key scores far below -88.7 (a padding token attending itself with q = -k).
// cuDNN attention alone (when it takes the call) against our path; ours must stay finite.
TEST_F(CudaPacked, CudnnMaskedBackwardPatternStaysFiniteOnOurPath) {
  const c10::Device cuda(torch::kCUDA);
  for (const int64_t T : {704, 1024}) {
    torch::manual_seed(5);
    const int64_t NH = 4, HD = 64;
    torch::Tensor positions = torch::arange(T).remainder(T - 64).unsqueeze(0);  // (1, T) a document, then 64 of one
    positions.narrow(1, T - 64, 64).zero_();
    const torch::Tensor mask = document_attention_mask(positions.to(cuda), c10::kBFloat16);  // (1, 1, T, T)
    torch::Tensor q0 = torch::randn({1, NH, T, HD}, torch::TensorOptions().device(cuda));
    torch::Tensor k0 = -q0 * 20;  // self scores ~ -20 HD / sqrt(HD) = -160, below -88.7
    torch::Tensor v0 = torch::randn({1, NH, T, HD}, torch::TensorOptions().device(cuda));
    const auto grad_of_q = [&](const std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&,
                                                                 const torch::Tensor&)>& attn) {
      torch::Tensor q = q0.to(torch::kBFloat16).requires_grad_(true);
      const torch::Tensor y = attn(q, k0.to(torch::kBFloat16), v0.to(torch::kBFloat16));
      y.to(torch::kFloat).square().sum().backward();
      return q.grad().to(torch::kFloat);
    };
    const torch::Tensor ours = grad_of_q([&](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
      return attend(q, k, v, DocumentAttention{mask, {}, 0}, 0.0);
    });
    auto& ctx = at::globalContext();
    const bool flash = ctx.userEnabledFlashSDP(), efficient = ctx.userEnabledMemEfficientSDP(),
               math = ctx.userEnabledMathSDP(), cudnn = ctx.userEnabledCuDNNSDP();
    std::string cudnn_result;
    try {
      ctx.setSDPUseFlash(false), ctx.setSDPUseMemEfficient(false), ctx.setSDPUseMath(false), ctx.setSDPUseCuDNN(true);
      const torch::Tensor g = grad_of_q([&](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
        return at::scaled_dot_product_attention(q, k, v, mask, 0.0, false);
      });
      cudnn_result = std::to_string(torch::isnan(g).sum().item<int64_t>()) + " NaN in dQ";
    } catch (const std::exception& e) {
      cudnn_result = std::string("refused (") + std::string(e.what()).substr(0, 120) + ")";
    }
    ctx.setSDPUseFlash(flash), ctx.setSDPUseMemEfficient(efficient), ctx.setSDPUseMath(math), ctx.setSDPUseCuDNN(cudnn);
    std::printf("[cuda attention] issue-196678 pattern T=%lld: cuDNN alone: %s; our path (%s): %lld NaN in dQ\n",
                static_cast<long long>(T), cudnn_result.c_str(),
                sdpa_backend(q0.to(torch::kBFloat16), q0.to(torch::kBFloat16), q0.to(torch::kBFloat16), mask, 0.0,
                             false).c_str(),
                static_cast<long long>(torch::isnan(ours).sum().item<int64_t>()));
    EXPECT_TRUE(torch::isfinite(ours).all().item<bool>()) << "T=" << T;
  }
}

// Which kernel each call picks, in every dtype, with and without dropout (a probe: it asserts
// only that the packed call never lands on cuDNN).
TEST_F(CudaPacked, KernelChoicesArePrintedAndTheMaskedCallAvoidsCudnn) {
  const c10::Device cuda(torch::kCUDA);
  const GPT2Config c = GPT2Config::preset("gpt2");
  for (const auto dtype : {c10::kBFloat16, c10::kHalf, c10::kFloat}) {
    for (const double dropout : {0.0, 0.1}) {
      const std::string line = describe_attention_kernels(c, cuda, dtype, 1024, dropout, PackedAttention::kMask);
      std::printf("[cuda attention] %s\n", line.c_str());
      EXPECT_EQ(line.find("packed documents -> cuDNN"), std::string::npos) << line;
    }
  }
}

// A step whose found_inf (on the device) is set, with NaN gradients, changes no weight and no
// state (moments, scales, step counts).
void expect_skipped_step_changes_nothing(AdamW8bit& gpu, torch::Tensor& w, torch::Tensor& b) {
  std::vector<torch::Tensor> before;
  for (const auto& [name, t] : gpu.checkpoint_state()) before.push_back(t.clone());
  const torch::Tensor w_before = w.detach().clone();
  w.mutable_grad() = torch::full_like(w, std::numeric_limits<float>::quiet_NaN());
  b.mutable_grad() = torch::randn_like(b);
  GradientScaling skip;
  skip.found_inf = torch::ones({}, torch::TensorOptions().device(w.device()));
  gpu.step(1e-3, skip);
  EXPECT_TRUE(torch::equal(w, w_before));
  const NamedTensors after = gpu.checkpoint_state();
  for (size_t i = 0; i < after.size(); ++i) EXPECT_TRUE(torch::equal(after[i].second, before[i])) << after[i].first;
}

TEST_F(CudaPacked, AdamW8bitStepsEqualTheCpuSkipOnTheDeviceAndRoundTrip) {
  const c10::Device cuda(torch::kCUDA);
  torch::manual_seed(3);
  const torch::Tensor w0 = torch::randn({64, 256}) * 0.02, b0 = torch::randn({100}) * 0.02;
  torch::Tensor wc = w0.clone().requires_grad_(true), bc = b0.clone().requires_grad_(true);
  torch::Tensor wg = w0.to(cuda).requires_grad_(true), bg = b0.to(cuda).requires_grad_(true);
  AdamW8bit cpu({{"w", wc}, {"b", bc}}, AdamWOptions{}, AdamW8bit::Kernel::kOps);
  AdamW8bit gpu({{"w", wg}, {"b", bg}}, AdamWOptions{}, AdamW8bit::Kernel::kOps);
  for (int step = 0; step < 3; ++step) {
    const torch::Tensor gw = torch::randn({64, 256}) * 1e-2, gb = torch::randn({100}) * 1e-2;
    wc.mutable_grad() = gw.clone(), bc.mutable_grad() = gb.clone();
    wg.mutable_grad() = gw.to(cuda), bg.mutable_grad() = gb.to(cuda);
    GradientScaling cpu_finite, gpu_finite;
    cpu_finite.found_inf = torch::zeros({});
    gpu_finite.found_inf = torch::zeros({}, torch::TensorOptions().device(cuda));
    cpu.step(1e-3, cpu_finite);
    gpu.step(1e-3, gpu_finite);  // the skip folded in on the device
  }
  const double dw = test::max_abs_diff(wg, wc), db = test::max_abs_diff(bg, bc);
  const auto& sc = cpu.states()[0];
  const auto& sg = gpu.states()[0];
  const double codes_differ = (sg.exp_avg.cpu() != sc.exp_avg).sum().item<double>() / static_cast<double>(sc.exp_avg.numel());
  std::printf("[cuda 8-bit] 3 steps vs the CPU: max|dw| %.3g, max|db| %.3g, %.4f%% of exp_avg codes differ\n", dw, db,
              100 * codes_differ);
  EXPECT_LT(dw, 1e-6);
  EXPECT_LT(db, 1e-6);
  EXPECT_LT(codes_differ, 1e-3);

  expect_skipped_step_changes_nothing(gpu, wg, bg);

  // Saved and restored into a fresh optimizer on the GPU: the next step is bitwise the same.
  test::TempDir tmp;
  save_safetensors(tmp.path() / "state.safetensors", gpu.checkpoint_state());
  torch::Tensor w2 = wg.detach().clone().requires_grad_(true), b2 = bg.detach().clone().requires_grad_(true);
  AdamW8bit other({{"w", w2}, {"b", b2}}, AdamWOptions{}, AdamW8bit::Kernel::kOps);
  other.restore_state(SafetensorsReader(tmp.path() / "state.safetensors"));
  const torch::Tensor gw = torch::randn({64, 256}, torch::TensorOptions().device(cuda)) * 1e-2;
  const torch::Tensor gb = torch::randn({100}, torch::TensorOptions().device(cuda)) * 1e-2;
  wg.mutable_grad() = gw.clone(), bg.mutable_grad() = gb.clone();
  w2.mutable_grad() = gw.clone(), b2.mutable_grad() = gb.clone();
  gpu.step(1e-3);
  other.step(1e-3);
  EXPECT_TRUE(torch::equal(wg, w2));
  EXPECT_TRUE(torch::equal(bg, b2));
}

// The CUDA kernel (one launch a tensor, the skip on the device) against the CPU's fused kernel,
// which runs the same formulas block by block: 3 steps with weight decay, a quantized tensor and
// a float32 one. The bias corrections are rounded independently on each side (the CPU's float32
// pow may be an ulp off the correctly rounded one), so the bound is a few ulps of the weights,
// and a code may differ by one where that ulp moves a value across a rounding tie; the counts
// of bitwise-equal weights and codes are printed. Then a skipped step changes nothing.
TEST_F(CudaPacked, AdamW8bitCudaKernelEqualsTheCpuKernelAndSkipsOnTheDevice) {
  ASSERT_TRUE(adamw_8bit_cuda_kernel_available()) << "built without nvcc: the GPU check must build the kernel";
  const c10::Device cuda(torch::kCUDA);
  torch::manual_seed(4);
  const torch::Tensor w0 = torch::randn({64, 256}) * 0.02, b0 = torch::randn({100}) * 0.02;
  torch::Tensor wc = w0.clone().requires_grad_(true), bc = b0.clone().requires_grad_(true);
  torch::Tensor wg = w0.to(cuda).requires_grad_(true), bg = b0.to(cuda).requires_grad_(true);
  AdamWOptions options;
  options.weight_decay = 0.1;
  AdamW8bit cpu({{"w", wc}, {"b", bc}}, options), gpu({{"w", wg}, {"b", bg}}, options);  // kAuto: the kernels
  for (int step = 0; step < 3; ++step) {
    const torch::Tensor gw = torch::randn({64, 256}) * 1e-2, gb = torch::randn({100}) * 1e-2;
    wc.mutable_grad() = gw.clone(), bc.mutable_grad() = gb.clone();
    wg.mutable_grad() = gw.to(cuda), bg.mutable_grad() = gb.to(cuda);
    GradientScaling finite;
    finite.found_inf = torch::zeros({}, torch::TensorOptions().device(cuda));
    cpu.step(1e-3);
    gpu.step(1e-3, finite);
  }
  const auto relative = [](const torch::Tensor& a, const torch::Tensor& b) {
    return ((a.cpu() - b).abs() / (b.abs() + 1e-6)).max().item<double>();
  };
  const auto& sc = cpu.states()[0];
  const auto& sg = gpu.states()[0];
  const torch::Tensor m_codes = sg.exp_avg.cpu().to(torch::kInt), v_codes = sg.exp_avg_sq.cpu().to(torch::kInt);
  const int64_t m_differ = (m_codes != sc.exp_avg.to(torch::kInt)).sum().item<int64_t>();
  const int64_t v_differ = (v_codes != sc.exp_avg_sq.to(torch::kInt)).sum().item<int64_t>();
  const int64_t far = ((m_codes - sc.exp_avg.to(torch::kInt)).abs() > 1).sum().item<int64_t>() +
                      ((v_codes - sc.exp_avg_sq.to(torch::kInt)).abs() > 1).sum().item<int64_t>();
  const int64_t w_equal = (wg.detach().cpu() == wc.detach()).sum().item<int64_t>();
  std::printf("[cuda 8-bit] CUDA kernel vs the CPU kernel, 3 steps: weights max rel %.3g (%lld of %lld bitwise), "
              "bias max rel %.3g; exp_avg codes differing %lld, exp_avg_sq %lld of %lld; scales max rel %.3g / %.3g; "
              "moments of the bias max rel %.3g\n",
              relative(wg, wc), static_cast<long long>(w_equal), static_cast<long long>(wc.numel()), relative(bg, bc),
              static_cast<long long>(m_differ), static_cast<long long>(v_differ), static_cast<long long>(wc.numel()),
              relative(sg.exp_avg_scales, sc.exp_avg_scales), relative(sg.exp_avg_sq_scales, sc.exp_avg_sq_scales),
              relative(gpu.states()[1].exp_avg, cpu.states()[1].exp_avg));
  EXPECT_LT(relative(wg, wc), 1e-6);
  EXPECT_LT(relative(bg, bc), 1e-6);
  EXPECT_EQ(far, 0) << "codes more than one apart";
  EXPECT_LT(static_cast<double>(m_differ + v_differ) / static_cast<double>(2 * wc.numel()), 1e-3);
  EXPECT_LT(relative(sg.exp_avg_scales, sc.exp_avg_scales), 1e-6);
  EXPECT_LT(relative(sg.exp_avg_sq_scales, sc.exp_avg_sq_scales), 1e-6);
  expect_skipped_step_changes_nothing(gpu, wg, bg);
}

TEST_F(CudaPacked, EvaluationOfDocumentShardsEqualsTheCpu) {
  test::TempDir tmp;
  std::mt19937 rng(8);
  std::vector<uint32_t> tokens;
  ShardDocuments docs;
  for (int d = 0; d < 40; ++d) {  // eot, prompt, completion, eot; targets the completion and the closing eot
    const int p = 1 + static_cast<int>(rng() % 20), c = 1 + static_cast<int>(rng() % 20);
    docs.starts.push_back(static_cast<uint32_t>(tokens.size()));
    tokens.push_back(100);
    docs.targets.push_back(false);
    for (int i = 0; i < p + c; ++i) {
      tokens.push_back(rng() % 100);
      docs.targets.push_back(i >= p);
    }
    tokens.push_back(100);
    docs.targets.push_back(true);
  }
  write_shard(tmp.path() / "val.bin", tokens, 2, &docs);
  GPT2 model(small_config(0.0));
  init_gpt2_weights(model, 4);
  EvalOptions o;
  o.seq_len = 64;
  o.batch_size = 3;
  const EvalResult cpu = evaluate(model, {tmp.path() / "val.bin"}, o, torch::kCPU);
  model->to(torch::kCUDA);
  const EvalResult gpu = evaluate(model, {tmp.path() / "val.bin"}, o, torch::kCUDA);
  std::printf("[cuda eval] document shards: loss %.7f on CUDA, %.7f on the CPU, %lld targets\n", gpu.loss, cpu.loss,
              static_cast<long long>(gpu.tokens));
  EXPECT_EQ(gpu.tokens, cpu.tokens);
  EXPECT_NEAR(gpu.loss, cpu.loss, 1e-5 * cpu.loss);
}

}  // namespace
}  // namespace gpt2ft
