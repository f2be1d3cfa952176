// Global-norm clipping on the device.
#include "gpt2ft/optim/grad_clip.h"

#include <torch/torch.h>

namespace gpt2ft {

ClippedNorm clip_grad_norm_(const std::vector<torch::Tensor>& grads, double max_norm) {
  torch::NoGradGuard no_grad;
  ClippedNorm out;
  if (grads.empty()) {
    out.norm = torch::zeros({});
    return out;
  }
  const auto norms = torch::_foreach_norm(grads, 2);
  out.norm = torch::linalg_vector_norm(torch::stack(norms), 2);  // ()
  if (max_norm > 0) {
    out.coef = torch::clamp(max_norm / (out.norm + 1e-6), c10::nullopt, 1.0);
    torch::_foreach_mul_(grads, *out.coef);
  }
  return out;
}

}  // namespace gpt2ft
