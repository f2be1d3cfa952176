// The optimizer behind the training step, as the step and the checkpoints see it: it updates
// the trained parameters it owns and holds their state. The trainer never asks which kind it
// has: plain AdamW (train/adamw.h) and ZeRO-1's sharded AdamW (distributed/optimizer_shards.h)
// implement it, and so can an optimizer whose state lives elsewhere or that trains adapters.
#pragma once

#include <optional>
#include <vector>

#include <torch/types.h>

#include "gpt2ft/io/safetensors.h"

namespace gpt2ft {

class Optimizer {
 public:
  virtual ~Optimizer() = default;

  // One update at learning rate `lr` of every parameter with a gradient. With found_inf (the
  // float16 loss scale's flag, a () float tensor), a nonzero flag leaves everything as it was.
  virtual void step(double lr, const std::optional<torch::Tensor>& found_inf = std::nullopt) = 0;

  // The state of every trained parameter, named for checkpoints ("adamw.exp_avg.<name>", ...).
  // Collective when the state is spread over ranks: rank 0 receives all of it.
  virtual NamedTensors checkpoint_state() const = 0;
  // Restores the state of the parameters this rank updates from a checkpoint's tensors; a
  // missing or misshapen entry is an Error naming it.
  virtual void restore_state(const SafetensorsReader& state) = 0;
};

}  // namespace gpt2ft
