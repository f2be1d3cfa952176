// AdamW with its state in host memory (train.optimizer_offload "cpu", ZeRO-Offload's idea):
// the device keeps the float32 weights the forward pass uses and their gradients; the host
// keeps a float32 copy of the trained weights and AdamW's two moments (12 bytes a parameter,
// pinned on CUDA), which frees 8 bytes a parameter on the GPU.
//
// Parameters are grouped, last registered first (the order backward finishes them), into
// buckets of about distributed.bucket_mb. With take_in_backward, during the last backward
// before a step each bucket is sent to the host as soon as backward has finished all of its
// gradients, on a copy stream, while backward goes on; end_backward() makes the compute stream
// wait for those copies before the gradients are unscaled, clipped or freed. step() then
//   sends the buckets backward did not finish (a parameter unused in the last micro batch),
//     already unscaled and clipped;
//   waits for each bucket's copy, multiplies what was sent early by the same unscale and clip
//     factors the device gradients got (the same float32 products, so the same numbers);
//   runs at::_fused_adamw_ on the bucket (vectorised, on all cores);
//   sends the bucket's updated weights back on the copy stream while the next is updated.
// Data-parallel runs average the gradients after backward, so their buckets go at step().
// On the CPU device the same path runs with plain host copies. The state is named as plain
// AdamW's, so checkpoints resume with or without offload.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <torch/types.h>

#include "gpt2ft/optim/adamw.h"
#include "gpt2ft/optim/optimizer.h"

namespace gpt2ft {

class OffloadedAdamW final : public Optimizer {
 public:
  // `named_params` live on `device`; bucket_bytes bounds a transfer bucket. take_in_backward:
  // send buckets as backward finishes them (not when something averages gradients later).
  // eight_bit: the host keeps 8-bit AdamW's state (optim/adamw_8bit.h) instead of AdamW's.
  OffloadedAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, AdamWOptions options,
                 c10::Device device, int64_t bucket_bytes, bool take_in_backward, bool eight_bit = false);
  ~OffloadedAdamW() override;
  OffloadedAdamW(const OffloadedAdamW&) = delete;
  OffloadedAdamW& operator=(const OffloadedAdamW&) = delete;

  void begin_last_backward() override;
  void end_backward() override;
  void step(double lr, const GradientScaling& scaling = {}) override;
  // How many buckets went to the host during backward and how many at the step.
  std::string run_report() const override;
  NamedTensors checkpoint_state() const override;
  // Restores the moments and takes the device weights (restored just before) as the host copy.
  void restore_state(const SafetensorsReader& state) override;
  NamedTensors state_layout(const std::string& name, const torch::Tensor& param) const override;

  // Host bytes it holds: the weights' copy, the moments and the gradient buffers.
  int64_t host_bytes() const;
  // The parameter names of each bucket, in bucket order.
  std::vector<std::vector<std::string>> bucket_names() const;
  // Called when a bucket's gradients have been sent to the host (queued, on CUDA): during
  // backward, or in step(). For tests.
  using TransferObserver = std::function<void(size_t bucket, bool during_backward)>;
  void observe_transfers(TransferObserver observer);

 private:
  struct State;  // shared with the gradient hooks
  void refresh_host_weights();
  std::shared_ptr<State> state_;
};

// Whether the host can hold what OffloadedAdamW needs for `trained_parameters` (with room for
// the rest of the process); an Error naming both figures otherwise.
void check_host_memory_for_offload(int64_t trained_parameters, bool eight_bit = false);

}  // namespace gpt2ft
