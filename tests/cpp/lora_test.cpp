// LoRA against PEFT: a PEFT adapter on a transformers base gives the same logits, loss and
// adapter gradients in our model (make_lora_golden.py); PEFT's target matching, the adapter's
// initial no-op, merging, and adapter folders that round-trip or are refused with a reason.
#include "gpt2ft/model/lora.h"

#include <fstream>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/model/init.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

class LoraParity : public ::testing::TestWithParam<std::string> {};

TEST_P(LoraParity, LogitsLossAndAdapterGradientsMatchPeft) {
  const auto dir = test::golden_dir() / GetParam();
  ASSERT_TRUE(std::filesystem::exists(dir / "golden.safetensors")) << dir << " (run through ctest)";
  GPT2 model = load_model_folder(dir / "base");
  attach_adapter_folder(model, dir / "adapter");
  model->eval();
  SafetensorsReader golden(dir / "golden.safetensors");
  const torch::Tensor ids = golden.load("input_ids");  // (B, T)
  const torch::Tensor logits = model->forward(ids);    // (B, T, V)
  const torch::Tensor loss = test::shifted_loss(logits, ids);
  loss.backward();

  const double logits_diff = test::max_abs_diff(logits, golden.load("logits"));
  const double loss_rel = std::abs(loss.item<double>() - golden.load("loss").item<double>()) / loss.item<double>();
  double worst = 0;
  int adapters = 0;
  for (const auto& item : model->named_parameters()) {
    if (!item.value().requires_grad()) {
      EXPECT_FALSE(item.value().grad().defined()) << item.key() << " is frozen";
      continue;
    }
    ASSERT_TRUE(is_lora_parameter(item.key())) << item.key();
    worst = std::max(worst, test::max_abs_diff(item.value().grad(), golden.load("grad.base_model.model." + item.key())));
    ++adapters;
  }
  int expected = 0;
  for (const auto& [key, entry] : golden.entries()) expected += key.rfind("grad.", 0) == 0;
  std::printf("[lora parity] %-12s logits max|diff| %.3g, loss rel diff %.3g, %d adapter grads, worst max|diff| %.3g\n",
              GetParam().c_str(), logits_diff, loss_rel, adapters, worst);
  EXPECT_EQ(adapters, expected);
  EXPECT_LT(logits_diff, 1e-5);
  EXPECT_LT(loss_rel, 1e-6);
  EXPECT_LT(worst, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Cases, LoraParity, ::testing::Values("lora", "lora_rslora"));

GPT2 small_model() {
  GPT2Config c;
  c.n_layer = 2, c.n_head = 2, c.n_embd = 16, c.vocab_size = 40, c.n_positions = 12;
  c.resid_pdrop = c.embd_pdrop = c.attn_pdrop = 0;
  GPT2 model(c);
  init_gpt2_weights(model, 5);
  model->eval();
  return model;
}

TEST(Lora, TargetsMatchAsPeftMatchesTargetModules) {
  EXPECT_TRUE(lora_targets("transformer.h.0.attn.c_proj", {"c_proj"}));
  EXPECT_TRUE(lora_targets("transformer.h.3.mlp.c_proj", {"c_proj"}));
  EXPECT_TRUE(lora_targets("transformer.h.3.mlp.c_proj", {"mlp.c_proj"}));
  EXPECT_FALSE(lora_targets("transformer.h.3.attn.c_proj", {"mlp.c_proj"}));
  EXPECT_FALSE(lora_targets("transformer.h.0.attn.c_proj", {"proj"}));  // whole name parts only
  GPT2 model = small_model();
  add_lora(model, {4, 8, 0, {"c_proj"}});
  EXPECT_EQ(lora_adapters(model).size(), 4u);  // attn and mlp, two blocks
  test::expect_error_containing([] {
    GPT2 m = small_model();
    add_lora(m, {4, 8, 0, {"q_proj"}});
  }, {"model.lora.targets", "q_proj", "matches no GPT-2 module"});
}

TEST(Lora, StartsAsANoOpTrainsOnlyAdaptersAndMergesExactly) {
  GPT2 model = small_model();
  const torch::Tensor ids = torch::randint(0, 40, {2, 12});
  const torch::Tensor before = model->forward(ids);
  add_lora(model, {3, 6, 0, {"c_attn", "c_fc"}});
  EXPECT_TRUE(torch::equal(model->forward(ids), before));  // B starts at zero
  int64_t trained = 0;
  for (const auto& item : model->named_parameters()) {
    EXPECT_EQ(item.value().requires_grad(), is_lora_parameter(item.key())) << item.key();
    trained += item.value().requires_grad();
  }
  EXPECT_EQ(trained, 2 * 2 * 2);  // A and B on two projections of two blocks
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, a] : lora_adapters(model)) a->B->weight.normal_(0, 0.3);
  }
  const torch::Tensor adapted = model->forward(ids);
  EXPECT_GT(test::max_abs_diff(adapted, before), 1e-3);
  merge_lora(model);
  EXPECT_FALSE(model->lora().has_value());
  for (const auto& item : model->named_parameters()) EXPECT_FALSE(is_lora_parameter(item.key())) << item.key();
  EXPECT_LT(test::max_abs_diff(model->forward(ids), adapted), 1e-5);
}

TEST(Lora, AdapterFoldersRoundTripAndUnsupportedOnesAreRefused) {
  test::TempDir tmp;
  GPT2 model = small_model();
  const LoraConfig config{2, 4, 0.05, {"c_attn", "c_proj"}, true};
  add_lora(model, config);
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, a] : lora_adapters(model)) a->B->weight.normal_();
  }
  save_adapter_folder(model, config, tmp.path() / "adapter", "some/base");
  const LoraConfig read = read_adapter_config(tmp.path() / "adapter");
  EXPECT_EQ(read.rank, 2);
  EXPECT_EQ(read.alpha, 4);
  EXPECT_EQ(read.targets, config.targets);
  EXPECT_TRUE(read.rslora);
  GPT2 other = small_model();
  attach_adapter_folder(other, tmp.path() / "adapter");
  const torch::Tensor ids = torch::randint(0, 40, {1, 12});
  EXPECT_TRUE(torch::equal(other->forward(ids), model->forward(ids)));

  auto write_config = [&](const std::string& text) {
    std::filesystem::create_directories(tmp.path() / "bad");
    std::ofstream(tmp.path() / "bad" / "adapter_config.json") << text;
  };
  write_config(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "c_.*"})");
  test::expect_error_containing([&] { read_adapter_config(tmp.path() / "bad"); },
                                {"adapter_config.json", "target_modules", "regular expression"});
  write_config(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "use_dora": true})");
  test::expect_error_containing([&] { read_adapter_config(tmp.path() / "bad"); }, {"use_dora", "only plain LoRA"});
  // Wrong types and out-of-range values in optional fields are errors naming the file and key,
  // not defaults (PEFT writes null for some: null is the default).
  for (const auto& [text, key] : std::vector<std::pair<std::string, std::string>>{
           {R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "lora_dropout": "0.1"})",
            "lora_dropout"},
           {R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "lora_dropout": 1.5})",
            "lora_dropout"},
           {R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "use_rslora": 1})",
            "use_rslora"},
           {R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "bias": 0})", "bias"},
           {R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "use_dora": "yes"})",
            "use_dora"},
           {R"({"peft_type": "LORA", "r": 1099511627776, "lora_alpha": 8, "target_modules": ["c_attn"]})", "r must"},
           {R"([1, 2])", "expected a JSON object"}}) {
    write_config(text);
    test::expect_error_containing([&] { read_adapter_config(tmp.path() / "bad"); }, {"adapter_config.json", key});
  }
  write_config(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "lora_dropout": null,
                   "bias": "none", "use_dora": false})");
  EXPECT_EQ(read_adapter_config(tmp.path() / "bad").dropout, 0);
  write_config(R"({"peft_type": "IA3", "target_modules": ["c_attn"]})");
  test::expect_error_containing([&] { read_adapter_config(tmp.path() / "bad"); }, {"peft_type", "IA3"});
  GPT2 wrong = small_model();
  add_lora(wrong, {5, 8, 0, {"c_attn", "c_proj"}});  // another rank than the saved adapter
  test::expect_error_containing([&] { load_adapter_weights(wrong, tmp.path() / "adapter"); },
                                {"adapter_model.safetensors", "lora_A.weight", "wrong shape"});
}

}  // namespace
}  // namespace gpt2ft
