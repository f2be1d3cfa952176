// GradScaler on ATen's AMP kernels.
#include "gpt2ft/optim/grad_scaler.h"

#include <torch/torch.h>

namespace gpt2ft {

GradScaler::GradScaler(c10::Device device, GradScalerOptions options) : options_(options) {
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(device);
  scale_ = torch::full({}, options.init_scale, f32);
  growth_tracker_ = torch::zeros({}, torch::TensorOptions().dtype(torch::kInt).device(device));
  found_inf_ = torch::zeros({}, f32);
  skipped_ = torch::zeros({}, f32);
}

void GradScaler::unscale_(const std::vector<torch::Tensor>& grads) {
  torch::NoGradGuard no_grad;
  found_inf_.zero_();
  inv_scale_ = scale_.to(torch::kDouble).reciprocal().to(torch::kFloat);  // as torch.amp.GradScaler
  at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf_, inv_scale_);
}

void GradScaler::update() {
  torch::NoGradGuard no_grad;
  skipped_.add_(found_inf_);
  at::_amp_update_scale_(scale_, growth_tracker_, found_inf_, options_.growth_factor, options_.backoff_factor,
                         options_.growth_interval);
}

void GradScaler::load_state(const torch::Tensor& scale, const torch::Tensor& growth_tracker,
                            const torch::Tensor& skipped) {
  torch::NoGradGuard no_grad;
  scale_.copy_(scale);
  growth_tracker_.copy_(growth_tracker);
  skipped_.copy_(skipped);
}

}  // namespace gpt2ft
