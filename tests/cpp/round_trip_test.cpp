// C++ loads a model, changes its weights and saves it; tests/python/check_round_trip.py then
// loads the result with transformers and compares its logits with the ones written here.
#include <cstdlib>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/io/safetensors.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

class RoundTrip : public ::testing::TestWithParam<std::string> {};

TEST_P(RoundTrip, SavesAFolderForTransformers) {
  const char* out_env = std::getenv("GPT2FT_ROUNDTRIP_DIR");
  ASSERT_NE(out_env, nullptr) << "GPT2FT_ROUNDTRIP_DIR is not set (run through ctest)";
  ASSERT_FALSE(test::golden_dir().empty());
  const auto src = test::golden_dir() / GetParam();
  const auto out = std::filesystem::path(out_env) / GetParam();
  std::filesystem::create_directories(out);

  GPT2 model = load_model_folder(src / "model");
  model->eval();
  {
    torch::NoGradGuard no_grad;
    torch::manual_seed(7);
    for (auto& p : model->parameters()) p.add_(0.02 * torch::randn_like(p));
  }
  save_model_folder(model, out / "model");

  // Reloading in C++ gives back exactly what was saved.
  GPT2 reloaded = load_model_folder(out / "model");
  auto a = model->named_parameters(), b = reloaded->named_parameters();
  for (const auto& item : a) EXPECT_TRUE(torch::equal(item.value(), b[item.key()])) << item.key();

  SafetensorsReader golden(src / "golden.safetensors");
  const torch::Tensor ids = golden.load("input_ids");
  torch::NoGradGuard no_grad;
  const torch::Tensor logits = model->forward(ids);
  // The perturbation must matter, or the check below would pass on the unchanged model too.
  EXPECT_GT(test::max_abs_diff(logits, golden.load("logits")), 1e-3);
  save_safetensors(out / "cpp_logits.safetensors", {{"input_ids", ids}, {"logits", logits}});
}

INSTANTIATE_TEST_SUITE_P(Shapes, RoundTrip, ::testing::Values("tiny", "untied_gelu", "bare_bf16"));

}  // namespace
}  // namespace gpt2ft
