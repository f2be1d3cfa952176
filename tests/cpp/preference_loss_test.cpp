// The DPO losses against TRL's formulas (tests/python/make_dpo_golden.py): loss, gradient in
// the policy's log-probs and the reward metrics, per loss type.
#include <torch/torch.h>

#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/train/preference_loss.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

struct Case {
  const char* name;
  PreferenceLossOptions options;
};

TEST(PreferenceLoss, EveryLossTypeEqualsTrlsFormulas) {
  const auto file = test::golden_dir() / "dpo.safetensors";
  ASSERT_TRUE(std::filesystem::exists(file)) << file << " (run through ctest)";
  SafetensorsReader golden(file);
  const torch::Tensor rc = golden.load("reference_chosen"), rr = golden.load("reference_rejected");
  for (const Case& c : {Case{"sigmoid", {"sigmoid", 0.1, 0.0}}, Case{"sigmoid_smoothed", {"sigmoid", 0.1, 0.2}},
                        Case{"sigmoid_beta_half", {"sigmoid", 0.5, 0.0}}, Case{"ipo", {"ipo", 0.1, 0.0}},
                        Case{"hinge", {"hinge", 0.1, 0.0}}}) {
    SCOPED_TRACE(c.name);
    const std::string n = c.name;
    torch::Tensor pc = golden.load("policy_chosen").requires_grad_(), pr = golden.load("policy_rejected").requires_grad_();
    const PreferenceLoss r = preference_loss(pc, pr, rc, rr, c.options);
    r.loss.backward();
    const double want = golden.load(n + ".loss").item<double>();
    EXPECT_NEAR(r.loss.item<double>(), want, 1e-5 * std::abs(want)) << "loss";
    const torch::Tensor gc = golden.load(n + ".grad_chosen"), gr = golden.load(n + ".grad_rejected");
    const double scale = std::max(gc.abs().max().item<double>(), 1e-12);
    EXPECT_LE((pc.grad() - gc).abs().max().item<double>(), 1e-5 * scale) << "gradient in the chosen log-probs";
    EXPECT_LE((pr.grad() - gr).abs().max().item<double>(), 1e-5 * scale) << "gradient in the rejected log-probs";
    for (const auto& [metric, ours] : {std::pair<const char*, torch::Tensor>{"chosen_reward", r.chosen_reward},
                                       {"rejected_reward", r.rejected_reward},
                                       {"accuracy", r.accuracy},
                                       {"margin", r.margin}}) {
      const double theirs = golden.load(n + "." + metric).item<double>();
      EXPECT_NEAR(ours.item<double>(), theirs, 1e-5 * std::max(1.0, std::abs(theirs))) << metric;
    }
    EXPECT_FLOAT_EQ(r.chosen_logp.item<float>(), golden.load("policy_chosen").mean().item<float>());
  }
}

TEST(PreferenceLoss, BadOptionsAreNamed) {
  const torch::Tensor x = torch::zeros({2});
  test::expect_error_containing([&] { preference_loss(x, x, x, x, {"kto", 0.1, 0.0}); }, {"dpo.loss", "\"kto\""});
  test::expect_error_containing([&] { preference_loss(x, x, x, x, {"sigmoid", 0.0, 0.0}); }, {"dpo.beta"});
}

}  // namespace
}  // namespace gpt2ft
