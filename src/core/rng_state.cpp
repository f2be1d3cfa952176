// Default generator state access, under each generator's lock.
#include "gpt2ft/core/rng_state.h"

#include <mutex>

#include <ATen/Context.h>

namespace gpt2ft {

torch::Tensor get_rng_state(const c10::Device& device) {
  at::Generator gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const c10::Device& device, const torch::Tensor& state) {
  at::Generator gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

RngStates get_rng_states(const c10::Device& device) {
  RngStates out = {{c10::kCPU, get_rng_state(c10::kCPU)}};
  if (device.is_cuda()) out.emplace_back(device, get_rng_state(device));
  return out;
}

void set_rng_states(const RngStates& states) {
  for (const auto& [device, state] : states) set_rng_state(device, state);
}

}  // namespace gpt2ft
