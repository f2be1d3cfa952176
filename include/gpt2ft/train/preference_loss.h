// The preference (DPO) losses over a batch of examples, as TRL's DPOTrainer computes them from
// the log-probabilities of each example's chosen and rejected continuations under the policy
// and under the reference model:
//
//   z = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
//   "sigmoid"  -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)   (eps: label smoothing,
//              the conservative DPO form older TRL used; TRL 1.16 ignores it for this loss)
//   "ipo"      (z - 1 / (2 beta))^2, on log-probs that are each continuation's mean over its
//              targets (the caller divides, as TRL does)
//   "hinge"    relu(1 - beta z)
//   loss = mean over the examples
//
// and TRL's metrics: rewards beta (policy - reference) per continuation, their accuracy (chosen
// above rejected) and margin, and the policy's log-probs.
#pragma once

#include <string>

#include <torch/types.h>

namespace gpt2ft {

struct PreferenceLossOptions {
  std::string loss = "sigmoid";  // "sigmoid" | "ipo" | "hinge"
  double beta = 0.1;
  double label_smoothing = 0.0;  // "sigmoid" only
};

struct PreferenceLoss {
  torch::Tensor loss;  // () the mean over the examples; differentiable in the policy's log-probs
  // () detached means over the examples, TRL's names in comments:
  torch::Tensor chosen_reward;    // rewards/chosen
  torch::Tensor rejected_reward;  // rewards/rejected
  torch::Tensor accuracy;         // rewards/accuracies
  torch::Tensor margin;           // rewards/margins
  torch::Tensor chosen_logp;      // logps/chosen
  torch::Tensor rejected_logp;    // logps/rejected
};

// Each argument is (N) float32, one value per example. An unknown loss or a beta <= 0 is an
// Error.
PreferenceLoss preference_loss(const torch::Tensor& policy_chosen, const torch::Tensor& policy_rejected,
                               const torch::Tensor& reference_chosen, const torch::Tensor& reference_rejected,
                               const PreferenceLossOptions& options);

}  // namespace gpt2ft
