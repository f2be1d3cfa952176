// AdamW with decay and no-decay parameter groups. Two implementations of the same update:
// fused (one at::_fused_adamw_ kernel per group, which also skips on the loss scale's
// found_inf without a host sync) and unfused (PyTorch's single-tensor AdamW, op by op). The
// state is plain tensors, so checkpoints can save and restore it.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>

#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/optim/optimizer.h"

namespace gpt2ft {

struct AdamWOptions {
  double weight_decay = 0.1;
  std::array<double, 2> betas{0.9, 0.95};
  double eps = 1e-8;
  bool fused = false;
  // AdamW8bit only: quantize the embeddings' moments too (torchao's rule, by size alone). Off:
  // wte, wpe and an untied lm_head keep float32 moments, as bitsandbytes' stable embedding
  // does: a rare token's rows see rare, large gradients that 8-bit blocks shared with common
  // rows round away (train.adamw_8bit.embeddings).
  bool quantize_embeddings = false;
};

// The defined gradients of `params` (a parameter that got none in this step has none), and
// setting them all to none.
std::vector<torch::Tensor> gradients_of(const std::vector<torch::Tensor>& params);
void clear_gradients(const std::vector<torch::Tensor>& params);

class AdamW final : public Optimizer {
 public:
  struct Group {
    std::vector<std::string> names;
    std::vector<torch::Tensor> params, exp_avg, exp_avg_sq, steps;  // steps: () float32 each
    double weight_decay = 0;
  };

  // Parameters with requires_grad; those with dim >= 2 decay, the rest (biases, LayerNorm) do not.
  AdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, AdamWOptions options);

  // One update at learning rate `lr` from the gradients as they are. A step with found_inf
  // != 0 changes nothing (fused: in the kernel; unfused: one host read of the flag). A
  // parameter without a gradient is left alone, as torch.optim.AdamW does: no decay, no moment
  // update, its step count unchanged.
  void step(double lr, const GradientScaling& scaling = {}) override;
  // "adamw.exp_avg.<name>", "adamw.exp_avg_sq.<name>" and "adamw.step.<name>".
  NamedTensors checkpoint_state() const override;
  void restore_state(const SafetensorsReader& state) override;
  NamedTensors state_layout(const std::string& name, const torch::Tensor& param) const override;

  std::vector<Group>& groups() { return groups_; }
  const std::vector<Group>& groups() const { return groups_; }
  const AdamWOptions& options() const { return options_; }

 private:
  void step_unfused(Group& g, const std::vector<size_t>& with_grad, double lr);
  AdamWOptions options_;
  std::vector<Group> groups_;
};

// optimizer.checkpoint_state() of a plain AdamW.
NamedTensors adamw_state(const AdamW& optimizer);
// AdamW's checkpoint entries for one parameter, empty (Optimizer::state_layout).
NamedTensors adamw_state_layout(const std::string& name, const torch::Tensor& param);

}  // namespace gpt2ft
