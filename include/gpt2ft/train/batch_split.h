// How the global batch (sequences per optimizer step, over all ranks) is split: each rank
// takes global / world of them, in micro batches of `micro` sequences, accumulated over
// global / (world * micro) forward/backward passes.
#pragma once

#include <cstdint>

#include "gpt2ft/train/config.h"

namespace gpt2ft {

struct BatchSplit {
  int64_t global = 0;  // sequences per optimizer step, all ranks
  int64_t world = 1;   // data-parallel ranks
  int64_t micro = 0;   // sequences per forward/backward pass on one rank
  // micro_batch_size "auto" with gradient_accumulation_steps (Hugging Face's way): the global
  // batch follows the micro batch "auto" picks (micro x accumulation x ranks); a resume takes
  // the checkpoint's instead.
  int64_t auto_accumulation = 0;

  int64_t per_rank() const { return global / world; }
  int64_t accumulation() const { return per_rank() / micro; }
};

// The split the config asks for on `world` ranks, before "auto" and resume choose the micro
// batch (micro is 0 for "auto"). A global batch that the ranks cannot share is an Error.
BatchSplit batch_split_of(const TrainConfig& config, int64_t world);

// The largest divisor of n that is at most `limit` (>= 1).
int64_t largest_divisor_at_most(int64_t n, int64_t limit);

// The largest micro batch below `micro` (at most half of it, at least `minimum`) that divides
// `per_rank`; 0 when there is none.
int64_t smaller_micro_batch(int64_t micro, int64_t per_rank, int64_t minimum);

}  // namespace gpt2ft
