// Activation (gradient) checkpointing for one transformer block: the forward pass keeps only
// the block's input; backward runs the block again and differentiates through it. Dropout
// draws the same masks in the recomputation (CPU and CUDA RNG states are saved and
// restored), autocast runs with the same settings, and autocast's weight-cast cache is off
// in both passes so a cast made without autograd is never reused with it.
#pragma once

#include <torch/types.h>

#include "gpt2ft/model/gpt2.h"

namespace gpt2ft {

// block(x, docs) for x (B, T, C), with the activations recomputed in backward (docs: how
// packed documents attend, or nothing for causal attention).
torch::Tensor checkpointed_block_forward(BlockImpl& block, const torch::Tensor& x, const DocumentAttention& docs = {});

}  // namespace gpt2ft
