// Global-norm gradient clipping, as torch.nn.utils.clip_grad_norm_, without a host sync.
#pragma once

#include <optional>
#include <vector>

#include <torch/types.h>

namespace gpt2ft {

struct ClippedNorm {
  torch::Tensor norm;                 // () the global L2 norm before clipping
  std::optional<torch::Tensor> coef;  // () what every gradient was multiplied by: min(1, max_norm / (norm + 1e-6))
};

// Multiplies `grads` in place so that their global norm is at most max_norm; max_norm <= 0
// only measures the norm (and leaves coef empty).
ClippedNorm clip_grad_norm_(const std::vector<torch::Tensor>& grads, double max_norm);

}  // namespace gpt2ft
