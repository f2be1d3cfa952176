// GPU parity (ctest label `gpu`): the golden models on CUDA in float32 and under bf16
// autocast, against transformers' float32 CPU reference. Skipped without CUDA.
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/io/safetensors.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

class CudaParity : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
    ASSERT_FALSE(test::golden_dir().empty()) << "GPT2FT_GOLDEN_DIR is not set (run through ctest)";
  }

  // Returns (relative logits error, loss abs error) for the model run on CUDA in `dtype`.
  std::pair<double, double> run(c10::ScalarType dtype) {
    const auto dir = test::golden_dir() / GetParam();
    GPT2 model = load_model_folder(dir / "model", torch::Device(torch::kCUDA, 0));
    model->eval();
    SafetensorsReader golden(dir / "golden.safetensors");
    const torch::Tensor ids = golden.load("input_ids").to(torch::kCUDA);
    const torch::Tensor ref = golden.load("logits");
    torch::NoGradGuard no_grad;
    AutocastGuard autocast(torch::kCUDA, dtype);
    const torch::Tensor logits = model->forward(ids).to(torch::kFloat);
    const double loss = test::shifted_loss(logits, ids).item<double>();
    const double rel = test::max_abs_diff(logits, ref) / ref.abs().max().item<double>();
    return {rel, std::abs(loss - golden.load("loss").item<double>())};
  }
};

TEST_P(CudaParity, Float32MatchesTransformers) {
  auto [rel, loss_diff] = run(torch::kFloat);
  std::printf("[cuda fp32] %s: logits max rel diff %.3g, loss abs diff %.3g\n", GetParam().c_str(), rel, loss_diff);
  EXPECT_LT(rel, 1e-5);
  EXPECT_LT(loss_diff, 1e-4);
}

TEST_P(CudaParity, Bfloat16AutocastIsClose) {
  auto [rel, loss_diff] = run(torch::kBFloat16);
  std::printf("[cuda bf16] %s: logits max rel diff %.3g, loss abs diff %.3g\n", GetParam().c_str(), rel, loss_diff);
  EXPECT_LT(rel, 5e-2);
  EXPECT_LT(loss_diff, 5e-2);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaParity, ::testing::Values("tiny", "odd_heads", "untied_gelu", "bare_bf16"));

}  // namespace
}  // namespace gpt2ft
