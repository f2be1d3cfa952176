// GPT-2's weight initialisation (as in the OpenAI release and transformers' _init_weights).
#pragma once

#include <cstdint>

#include "gpt2ft/model/gpt2.h"

namespace gpt2ft {

// Linear and embedding weights ~ N(0, initializer_range); the two residual projections
// (attn.c_proj, mlp.c_proj) ~ N(0, initializer_range / sqrt(2 * n_layer)); biases 0;
// LayerNorm weight 1, bias 0. Deterministic for a given seed.
void init_gpt2_weights(GPT2& model, uint64_t seed);

}  // namespace gpt2ft
