// The chunked projection + cross-entropy against PyTorch's own linear + cross_entropy: loss
// and both gradients, for chunk sizes that do and do not divide the rows, a scaled backward
// (loss scale / accumulation), tied use of the weight elsewhere, and bf16 autocast.
#include "gpt2ft/model/linear_cross_entropy.h"

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include "gpt2ft/core/autocast.h"

namespace gpt2ft {
namespace {

namespace F = torch::nn::functional;

struct Result {
  torch::Tensor loss, grad_hidden, grad_weight;
};

// loss * scale, where the weight is also used by a second term (like tied embeddings).
Result run(bool chunked, int64_t chunk, c10::ScalarType amp, double scale, c10::Device device = c10::kCPU) {
  torch::manual_seed(0);
  const int64_t N = 37, C = 24, V = 101;
  torch::Tensor h = torch::randn({N, C}).to(device).requires_grad_(true);
  torch::Tensor w = (0.3 * torch::randn({V, C})).to(device).requires_grad_(true);
  const torch::Tensor t = torch::randint(0, V, {N}).to(device);
  torch::Tensor loss;
  {
    AutocastGuard autocast(device.type(), amp);
    loss = chunked ? linear_cross_entropy(h, w, t, chunk) : F::cross_entropy(torch::linear(h, w).to(torch::kFloat), t);
  }
  (loss * scale + w.sum() * 0.01).backward();
  return {loss.detach(), h.grad(), w.grad()};
}

double rel(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).abs().max() / b.abs().max()).item<double>();
}

double rel_l2(const torch::Tensor& a, const torch::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); }

TEST(LinearCrossEntropy, MatchesLinearPlusCrossEntropyInFloat32) {
  const Result ref = run(false, 0, c10::kFloat, 3.5);
  for (const int64_t chunk : {1, 5, 16, 37, 100, 0}) {
    SCOPED_TRACE(::testing::Message() << "chunk rows " << chunk);
    const Result got = run(true, chunk, c10::kFloat, 3.5);
    EXPECT_EQ(got.loss.scalar_type(), torch::kFloat);
    EXPECT_LT(std::abs(got.loss.item<double>() - ref.loss.item<double>()), 1e-6);
    EXPECT_LT(rel(got.grad_hidden, ref.grad_hidden), 1e-5);
    EXPECT_LT(rel(got.grad_weight, ref.grad_weight), 1e-5);
  }
}

TEST(LinearCrossEntropy, MatchesUnderBfloat16Autocast) {
  // Both paths compute the logits in bf16; the chunked one sums d weight over chunks in
  // float32, so the gradients agree to bf16 precision, not bitwise.
  const Result ref = run(false, 0, c10::kBFloat16, 1.0);
  const Result got = run(true, 8, c10::kBFloat16, 1.0);
  EXPECT_LT(std::abs(got.loss.item<double>() - ref.loss.item<double>()), 1e-5);
  EXPECT_LT(rel(got.grad_hidden, ref.grad_hidden), 1e-2);
  EXPECT_LT(rel(got.grad_weight, ref.grad_weight), 1e-2);
  EXPECT_EQ(got.grad_weight.scalar_type(), torch::kFloat);
}

TEST(LinearCrossEntropy, Float16AutocastKeepsSmallProbabilitiesGradients) {
  // The rows of d weight for tokens that are never targets come only from probabilities / N,
  // here ~1e-7 and below: under float16 that is subnormal or zero. They must stay close to
  // the float32 gradient: casting (softmax - onehot) / N to float16 gives a relative (L2)
  // error of ~6e-3 on them, keeping the 1/N out of the cast ~2e-4 (float16 rounding).
  torch::manual_seed(3);
  const int64_t N = 2048, C = 16, V = 4000, targets_below = 100;
  const torch::Tensor h = torch::randn({N, C}).requires_grad_(true);
  const torch::Tensor w = (0.5 * torch::randn({V, C})).requires_grad_(true);
  const torch::Tensor t = torch::randint(0, targets_below, {N});
  linear_cross_entropy(h, w, t, 512).backward();
  const torch::Tensor ref_h = h.grad().clone(), ref_w = w.grad().clone();
  h.mutable_grad() = torch::Tensor();
  w.mutable_grad() = torch::Tensor();
  {
    AutocastGuard autocast(c10::kCPU, c10::kHalf);
    linear_cross_entropy(h, w, t, 512).backward();
  }
  EXPECT_LT(rel(h.grad(), ref_h), 2e-2);
  const auto never_targets = torch::indexing::Slice(targets_below, torch::indexing::None);
  EXPECT_LT(rel_l2(w.grad().index({never_targets}), ref_w.index({never_targets})), 1e-3);
}

TEST(LinearCrossEntropy, AFrozenWeightGetsNoGradient) {
  torch::manual_seed(2);
  torch::Tensor h = torch::randn({11, 8}).requires_grad_(true);
  const torch::Tensor w = torch::randn({30, 8});  // frozen, like tied embeddings under model.freeze_embeddings
  const torch::Tensor t = torch::randint(0, 30, {11});
  linear_cross_entropy(h, w, t, 4).backward();
  const torch::Tensor got = h.grad().clone();
  h.mutable_grad() = torch::Tensor();
  F::cross_entropy(torch::linear(h, w), t).backward();
  EXPECT_LT(rel(got, h.grad()), 1e-5);
  EXPECT_FALSE(w.grad().defined());
}

TEST(LinearCrossEntropy, WithoutGradientsOnlyTheLoss) {
  torch::manual_seed(1);
  const torch::Tensor h = torch::randn({9, 8}), w = torch::randn({30, 8});
  const torch::Tensor t = torch::randint(0, 30, {9});
  torch::NoGradGuard no_grad;
  const double expected = F::cross_entropy(torch::linear(h, w), t).item<double>();
  EXPECT_NEAR(linear_cross_entropy(h, w, t, 4).item<double>(), expected, 1e-6);
}

// On CUDA the 16-bit products are summed straight into the float32 gradients (addmm with a
// float32 output) and chunks are sized for the GPU; the results must match eager on CUDA.
class LinearCrossEntropyCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  }
};

TEST_F(LinearCrossEntropyCuda, MatchesEagerInFloat32Bfloat16AndFloat16) {
  const c10::Device cuda(c10::kCUDA, 0);
  struct Case {
    c10::ScalarType amp;
    double loss_tol, grad_tol;
  };
  for (const Case c : {Case{c10::kFloat, 1e-6, 1e-5}, Case{c10::kBFloat16, 1e-5, 1e-2}, Case{c10::kHalf, 1e-5, 2e-3}}) {
    SCOPED_TRACE(c10::toString(c.amp));
    const Result ref = run(false, 0, c.amp, 2.0, cuda);
    for (const int64_t chunk : {5, 37, 0}) {
      const Result got = run(true, chunk, c.amp, 2.0, cuda);
      std::printf("[cuda chunked loss] %s, chunk %lld: loss diff %.3g, d hidden %.3g, d weight %.3g (relative)\n",
                  c10::toString(c.amp), static_cast<long long>(chunk),
                  std::abs(got.loss.item<double>() - ref.loss.item<double>()), rel(got.grad_hidden, ref.grad_hidden),
                  rel(got.grad_weight, ref.grad_weight));
      EXPECT_LT(std::abs(got.loss.item<double>() - ref.loss.item<double>()), c.loss_tol);
      EXPECT_LT(rel(got.grad_hidden, ref.grad_hidden), c.grad_tol);
      EXPECT_LT(rel(got.grad_weight, ref.grad_weight), c.grad_tol);
      EXPECT_EQ(got.grad_weight.scalar_type(), torch::kFloat);
    }
  }
  EXPECT_GT(linear_cross_entropy_chunk_rows(50257, true), 3 * linear_cross_entropy_chunk_rows(50257, false));
}

}  // namespace
}  // namespace gpt2ft

namespace gpt2ft {
namespace {

// Per-row target log-probs against PyTorch's log_softmax + gather, with a different incoming
// gradient on every row (as a preference loss gives) and the weight used elsewhere too.
Result run_logprobs(bool chunked, int64_t chunk, c10::ScalarType amp, c10::Device device = c10::kCPU) {
  torch::manual_seed(1);
  const int64_t N = 29, C = 16, V = 83;
  torch::Tensor h = torch::randn({N, C}).to(device).requires_grad_(true);
  torch::Tensor w = (0.3 * torch::randn({V, C})).to(device).requires_grad_(true);
  const torch::Tensor t = torch::randint(0, V, {N}).to(device);
  const torch::Tensor weights = torch::randn({N}).to(device);  // d loss / d logprob per row
  torch::Tensor logprobs;
  {
    AutocastGuard autocast(device.type(), amp);
    logprobs = chunked ? linear_target_logprobs(h, w, t, chunk)
                       : torch::log_softmax(torch::linear(h, w).to(torch::kFloat), 1).gather(1, t.unsqueeze(1)).squeeze(1);
  }
  ((logprobs * weights).sum() + w.sum() * 0.01).backward();
  return {logprobs.detach(), h.grad(), w.grad()};
}

TEST(LinearCrossEntropy, TargetLogprobsMatchLogSoftmaxAndTheirPerRowGradients) {
  const Result ref = run_logprobs(false, 0, c10::kFloat);
  for (const int64_t chunk : {1, 4, 29, 64, 0}) {
    SCOPED_TRACE(::testing::Message() << "chunk rows " << chunk);
    const Result got = run_logprobs(true, chunk, c10::kFloat);
    EXPECT_LT(rel(got.loss, ref.loss), 1e-6);
    EXPECT_LT(rel(got.grad_hidden, ref.grad_hidden), 1e-5);
    EXPECT_LT(rel(got.grad_weight, ref.grad_weight), 1e-5);
  }
  const Result bf16_ref = run_logprobs(false, 0, c10::kBFloat16), bf16 = run_logprobs(true, 8, c10::kBFloat16);
  EXPECT_LT(rel(bf16.loss, bf16_ref.loss), 1e-5);
  EXPECT_LT(rel_l2(bf16.grad_hidden, bf16_ref.grad_hidden), 1e-2);
  EXPECT_LT(rel_l2(bf16.grad_weight, bf16_ref.grad_weight), 1e-2);
}

TEST_F(LinearCrossEntropyCuda, TargetLogprobsMatchEagerInFloat32Bfloat16AndFloat16) {
  const c10::Device cuda(c10::kCUDA, 0);
  for (const auto amp : {c10::kFloat, c10::kBFloat16, c10::kHalf}) {
    SCOPED_TRACE(c10::toString(amp));
    const Result ref = run_logprobs(false, 0, amp, cuda), got = run_logprobs(true, 8, amp, cuda);
    const double tol = amp == c10::kFloat ? 1e-5 : 2e-2;
    std::printf("[cuda target log-probs] %s: log-probs %.3g, d hidden %.3g, d weight %.3g (relative)\n",
                c10::toString(amp), rel(got.loss, ref.loss), rel_l2(got.grad_hidden, ref.grad_hidden),
                rel_l2(got.grad_weight, ref.grad_weight));
    EXPECT_LT(rel(got.loss, ref.loss), amp == c10::kFloat ? 1e-6 : 1e-5);
    EXPECT_LT(rel_l2(got.grad_hidden, ref.grad_hidden), tol);
    EXPECT_LT(rel_l2(got.grad_weight, ref.grad_weight), tol);
  }
}

}  // namespace
}  // namespace gpt2ft
