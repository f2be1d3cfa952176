// AdamW with its state in host memory (train.optimizer_offload "cpu", ZeRO-Offload's idea):
// the device keeps the float32 weights the forward pass uses and their gradients; the host
// keeps a float32 copy of the trained weights and AdamW's two moments (12 bytes a parameter,
// pinned on CUDA), which frees 8 bytes a parameter on the GPU.
//
// A step, bucket by bucket (distributed.bucket_mb of parameters each):
//   device -> host   the bucket's (already unscaled and clipped) gradients, on a copy stream
//   host             at::_fused_adamw_ on the bucket (vectorised, on all cores)
//   host -> device   the updated weights, on the copy stream
// All gradient copies are queued at once, so the copies of later buckets overlap the host
// step of earlier ones, and the weights of a bucket go back while the next is updated; the
// compute stream waits for the last copy before the next forward pass. On the CPU device the
// same path runs with plain host copies. The state is named as plain AdamW's, so checkpoints
// resume with or without offload.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <torch/types.h>

#include "gpt2ft/train/adamw.h"
#include "gpt2ft/train/optimizer.h"

namespace gpt2ft {

class OffloadedAdamW final : public Optimizer {
 public:
  // `named_params` live on `device`; bucket_bytes bounds a transfer bucket.
  OffloadedAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, AdamWOptions options,
                 c10::Device device, int64_t bucket_bytes);
  ~OffloadedAdamW() override;

  void step(double lr, const std::optional<torch::Tensor>& found_inf = std::nullopt) override;
  NamedTensors checkpoint_state() const override;
  // Restores the moments and takes the device weights (restored just before) as the host copy.
  void restore_state(const SafetensorsReader& state) override;

  // Host bytes it holds: the weights' copy, the moments and the gradient buffers.
  int64_t host_bytes() const;

 private:
  struct Bucket;
  void refresh_host_weights();
  c10::Device device_;
  std::vector<std::pair<std::string, torch::Tensor>> params_;  // on the device
  std::unique_ptr<AdamW> host_;  // over host copies of params_, in the same order
  std::vector<std::unique_ptr<Bucket>> buckets_;
};

// Whether the host can hold what OffloadedAdamW needs for `trained_parameters` (with room for
// the rest of the process); an Error naming both figures otherwise.
void check_host_memory_for_offload(int64_t trained_parameters);

}  // namespace gpt2ft
