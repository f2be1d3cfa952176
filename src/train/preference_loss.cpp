// The DPO family of preference losses.
#include "gpt2ft/train/preference_loss.h"

#include <torch/torch.h>

#include "gpt2ft/core/error.h"

namespace gpt2ft {

PreferenceLoss preference_loss(const torch::Tensor& policy_chosen, const torch::Tensor& policy_rejected,
                               const torch::Tensor& reference_chosen, const torch::Tensor& reference_rejected,
                               const PreferenceLossOptions& o) {
  if (!(o.beta > 0)) throw Error("dpo.beta: expected a number above 0, got " + std::to_string(o.beta));
  namespace F = torch::nn::functional;
  const torch::Tensor z = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected);  // (N)
  torch::Tensor losses;
  if (o.loss == "sigmoid") {
    losses = -F::logsigmoid(o.beta * z) * (1 - o.label_smoothing) - F::logsigmoid(-o.beta * z) * o.label_smoothing;
  } else if (o.loss == "ipo") {
    losses = (z - 1 / (2 * o.beta)).square();
  } else if (o.loss == "hinge") {
    losses = torch::relu(1 - o.beta * z);
  } else {
    throw Error("dpo.loss: expected \"sigmoid\", \"ipo\" or \"hinge\", got \"" + o.loss + "\"");
  }
  PreferenceLoss out;
  out.loss = losses.mean();
  torch::NoGradGuard no_grad;
  const torch::Tensor chosen = o.beta * (policy_chosen - reference_chosen);
  const torch::Tensor rejected = o.beta * (policy_rejected - reference_rejected);
  out.chosen_reward = chosen.mean();
  out.rejected_reward = rejected.mean();
  out.accuracy = (chosen > rejected).to(torch::kFloat).mean();
  out.margin = (chosen - rejected).mean();
  out.chosen_logp = policy_chosen.detach().mean();
  out.rejected_logp = policy_rejected.detach().mean();
  return out;
}

}  // namespace gpt2ft
