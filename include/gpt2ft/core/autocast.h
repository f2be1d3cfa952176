// RAII mixed-precision region over ATen's device-typed autocast API (the C++ twin of
// torch.autocast). Leaving the outermost region clears autocast's cache of weight casts.
#pragma once

#include <string>

#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

namespace gpt2ft {

// The autocast dtype of an amp.dtype setting on `device` (kFloat: no autocast). "auto" is
// bfloat16 on CUDA GPUs that have it (and when planning without a GPU present), float16 on
// older GPUs, and none on the CPU.
c10::ScalarType resolve_amp_dtype(const std::string& setting, c10::Device device);

class AutocastGuard {
 public:
  // dtype kFloat (or enabled=false) means "no autocast": the guard does nothing.
  AutocastGuard(c10::DeviceType device, c10::ScalarType dtype);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool active_ = false;
  c10::DeviceType device_;
  bool prev_enabled_ = false;
  c10::ScalarType prev_dtype_;
};

}  // namespace gpt2ft
