// Reading and restoring the default random generators' states (CPU, CUDA), for activation
// checkpointing, OOM retries and training checkpoints.
#pragma once

#include <c10/core/Device.h>
#include <torch/types.h>

namespace gpt2ft {

torch::Tensor get_rng_state(const c10::Device& device);
void set_rng_state(const c10::Device& device, const torch::Tensor& state);

}  // namespace gpt2ft
