// The optimizer behind the training step, as the step and the checkpoints see it: it updates
// the trained parameters it owns and holds their state. The trainer never asks which kind it
// has: plain AdamW (optim/adamw.h), AdamW on the host (optim/offloaded_adamw.h), 8-bit AdamW
// (optim/adamw_8bit.h) and ZeRO-1's sharded optimizer (distributed/optimizer_shards.h)
// implement it.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>

#include "gpt2ft/io/safetensors.h"

namespace gpt2ft {

// What the trainer did to the gradients between the end of backward and step(), in this
// order: unscaled them (multiplied by inv_scale, the float16 loss scale's reciprocal, which
// also set found_inf), then clipped them (multiplied by clip_coef). An optimizer that copied
// gradients out during backward applies the same to its copies; the others read the
// gradients as they now are and look only at found_inf.
struct GradientScaling {
  std::optional<torch::Tensor> found_inf;  // () float32: nonzero skips the step
  std::optional<torch::Tensor> inv_scale;  // () float32
  std::optional<torch::Tensor> clip_coef;  // () float32
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;

  // The next backward is the last before step(): a gradient may be taken as soon as backward
  // has finished it.
  virtual void begin_last_backward() {}
  // Backward is over, or was abandoned (out of memory): from here on the gradients may be
  // changed in place, or freed.
  virtual void end_backward() {}

  // One update at learning rate `lr` of every parameter with a gradient; with a nonzero
  // scaling.found_inf, nothing changes.
  virtual void step(double lr, const GradientScaling& scaling = {}) = 0;

  // What it did over the run that is worth a line in the log at the end ("" for nothing).
  virtual std::string run_report() const { return {}; }

  // The state of every trained parameter, named for checkpoints ("adamw.exp_avg.<name>", ...).
  // Collective when the state is spread over ranks: rank 0 receives all of it.
  virtual NamedTensors checkpoint_state() const = 0;
  // Restores the state of the parameters this rank updates from a checkpoint's tensors; a
  // missing or misshapen entry is an Error naming it.
  virtual void restore_state(const SafetensorsReader& state) = 0;
  // Empty tensors named and shaped as checkpoint_state's entries for one parameter (ZeRO-1
  // gathers each from the rank that owns it).
  virtual NamedTensors state_layout(const std::string& name, const torch::Tensor& param) const = 0;
};

}  // namespace gpt2ft
