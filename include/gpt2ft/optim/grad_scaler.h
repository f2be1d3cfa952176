// Dynamic loss scaling for float16 training, the C++ counterpart of torch.amp.GradScaler,
// built on ATen's _amp_foreach_non_finite_check_and_unscale_ and _amp_update_scale_. The
// scale, growth tracker and found_inf stay on the device: nothing here syncs with the host.
#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/Device.h>
#include <torch/types.h>

namespace gpt2ft {

struct GradScalerOptions {
  double init_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
};

class GradScaler {
 public:
  GradScaler(c10::Device device, GradScalerOptions options);

  torch::Tensor scale(const torch::Tensor& loss) const { return loss * scale_; }
  // Divides the gradients by the scale in place and sets found_inf() to 1 if any is inf/NaN.
  void unscale_(const std::vector<torch::Tensor>& grads);
  // Grows or backs off the scale from found_inf (after the optimizer step), and counts skips.
  void update();

  const torch::Tensor& scale_tensor() const { return scale_; }   // () float32
  const torch::Tensor& found_inf() const { return found_inf_; }  // () float32, 0 or 1
  const torch::Tensor& skipped_steps() const { return skipped_; } // () float32 total
  // () float32: what the last unscale_ multiplied the gradients by (1/scale, rounded as
  // torch.amp.GradScaler rounds it).
  const torch::Tensor& inv_scale() const { return inv_scale_; }

  // For checkpoints.
  torch::Tensor growth_tracker() const { return growth_tracker_; }
  void load_state(const torch::Tensor& scale, const torch::Tensor& growth_tracker, const torch::Tensor& skipped);

 private:
  GradScalerOptions options_;
  torch::Tensor scale_, growth_tracker_, found_inf_, skipped_, inv_scale_;
};

}  // namespace gpt2ft
