// Reading and restoring the default random generators' states (CPU, CUDA), for activation
// checkpointing, OOM retries and training checkpoints.
#pragma once

#include <utility>
#include <vector>

#include <c10/core/Device.h>
#include <torch/types.h>

namespace gpt2ft {

torch::Tensor get_rng_state(const c10::Device& device);
void set_rng_state(const c10::Device& device, const torch::Tensor& state);

// The states a computation on `device` draws from: the CPU's and, on CUDA, the device's.
using RngStates = std::vector<std::pair<c10::Device, torch::Tensor>>;
RngStates get_rng_states(const c10::Device& device);
void set_rng_states(const RngStates& states);

}  // namespace gpt2ft
