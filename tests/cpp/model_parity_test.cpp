// The C++ GPT-2 against transformers: logits, loss and every parameter's gradient, for each
// shape make_golden.py generated (float32, CPU).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/io/safetensors.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

// Where two (B, T, V) tensors differ most, and how many entries differ by more than 1e-5: one
// odd entry and a spread-out drift point at different causes.
std::string where_worst(const torch::Tensor& got, const torch::Tensor& want) {
  const torch::Tensor diff = (got.detach().to(torch::kDouble) - want.to(torch::kDouble)).abs();  // (B, T, V)
  const int64_t flat = diff.argmax().item<int64_t>();
  const int64_t V = diff.size(2), T = diff.size(1);
  const int64_t b = flat / (T * V), t = flat / V % T, v = flat % V;
  return "worst at batch " + std::to_string(b) + ", position " + std::to_string(t) + ", vocabulary " +
         std::to_string(v) + ": " + std::to_string(got[b][t][v].item<double>()) + " against " +
         std::to_string(want[b][t][v].item<double>()) + "; " + std::to_string((diff > 1e-5).sum().item<int64_t>()) +
         " of " + std::to_string(diff.numel()) + " entries over 1e-5";
}

class ModelParity : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelParity, LogitsLossAndGradientsMatchTransformers) {
  const auto dir = test::golden_dir() / GetParam();
  ASSERT_FALSE(test::golden_dir().empty()) << "GPT2FT_GOLDEN_DIR is not set (run through ctest)";
  ASSERT_TRUE(std::filesystem::exists(dir / "golden.safetensors")) << dir;

  GPT2 model = load_model_folder(dir / "model");
  model->eval();
  SafetensorsReader golden(dir / "golden.safetensors");
  const torch::Tensor ids = golden.load("input_ids");  // (B, T)

  const torch::Tensor logits = model->forward(ids);  // (B, T, V)
  const torch::Tensor loss = test::shifted_loss(logits, ids);
  loss.backward();

  const torch::Tensor ref_logits = golden.load("logits");  // (B, T, V)
  const double logits_diff = test::max_abs_diff(logits, ref_logits);
  const double ref_loss = golden.load("loss").item<double>();
  const double loss_rel = std::abs(loss.item<double>() - ref_loss) / std::abs(ref_loss);
  double worst_grad = 0;
  std::string worst_name;
  int compared = 0;
  for (const auto& item : model->named_parameters()) {
    const std::string key = "grad." + item.key();
    ASSERT_TRUE(golden.contains(key)) << "reference has no gradient for " << item.key();
    const double d = test::max_abs_diff(to_checkpoint_layout(item.key(), item.value().grad()), golden.load(key));
    if (d > worst_grad) worst_grad = d, worst_name = item.key();
    ++compared;
  }
  std::printf("[parity] %-12s logits max|diff| %.3g, loss rel diff %.3g, worst grad max|diff| %.3g (%s), %d grads\n",
              GetParam().c_str(), logits_diff, loss_rel, worst_grad, worst_name.c_str(), compared);
  EXPECT_LT(logits_diff, 1e-5) << where_worst(logits, ref_logits);
  EXPECT_LT(loss_rel, 1e-6);
  EXPECT_LT(worst_grad, 1e-5) << worst_name;
}

INSTANTIATE_TEST_SUITE_P(Shapes, ModelParity,
                         ::testing::Values("tiny", "odd_heads", "untied_gelu", "bare_bf16"));

}  // namespace
}  // namespace gpt2ft
