// Text generation with a KV cache: greedy (temperature 0) or sampling with temperature,
// top-k and top-p (nucleus), reproducible for a seed.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "gpt2ft/model/gpt2.h"

namespace gpt2ft {

struct GenerateOptions {
  int64_t max_new_tokens = 100;
  double temperature = 1.0;  // 0: greedy
  int64_t top_k = 0;         // 0: no limit
  double top_p = 1.0;        // 1: no limit
  uint64_t seed = 1337;
  std::vector<int64_t> stop_tokens;  // stop after generating one (end-of-text, a chat's end of turn)
};

// The prompt's continuation (new tokens only). Stops early at a stop token or n_positions.
std::vector<int64_t> generate(GPT2& model, const std::vector<int64_t>& prompt, const GenerateOptions& options);

}  // namespace gpt2ft
