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

}  // namespace gpt2ft
