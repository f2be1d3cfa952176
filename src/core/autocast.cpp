// Autocast region guard.
#include "gpt2ft/core/autocast.h"

#include <ATen/autocast_mode.h>
#include <torch/cuda.h>

#include "gpt2ft/core/cuda_info.h"

namespace gpt2ft {

c10::ScalarType resolve_amp_dtype(const std::string& setting, c10::Device device) {
  if (setting == "bfloat16") return c10::kBFloat16;
  if (setting == "float16") return c10::kHalf;
  if (setting != "auto" || !device.is_cuda()) return c10::kFloat;
  if (!torch::cuda::is_available()) return c10::kBFloat16;  // planning for a GPU elsewhere
  return cuda_supports_bfloat16(device) ? c10::kBFloat16 : c10::kHalf;
}

AutocastGuard::AutocastGuard(c10::DeviceType device, c10::ScalarType dtype)
    : device_(device), prev_dtype_(dtype) {
  if (dtype == c10::kFloat) return;
  active_ = true;
  prev_enabled_ = at::autocast::is_autocast_enabled(device);
  prev_dtype_ = at::autocast::get_autocast_dtype(device);
  at::autocast::set_autocast_enabled(device, true);
  at::autocast::set_autocast_dtype(device, dtype);
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_, prev_enabled_);
  at::autocast::set_autocast_dtype(device_, prev_dtype_);
}

}  // namespace gpt2ft
