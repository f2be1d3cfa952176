// Batch arithmetic.
#include "gpt2ft/train/batch_split.h"

#include <algorithm>
#include <string>

#include "gpt2ft/core/error.h"

namespace gpt2ft {

BatchSplit batch_split_of(const TrainConfig& cfg, int64_t world) {
  BatchSplit split;
  split.world = world;
  split.micro = cfg.train.micro_batch_size;  // 0: "auto"
  const int64_t accum = cfg.train.gradient_accumulation_steps > 0 ? cfg.train.gradient_accumulation_steps : 1;
  split.global = cfg.train.global_batch_size > 0 ? cfg.train.global_batch_size : split.micro * accum * world;
  if (cfg.micro_batch_auto() && cfg.train.global_batch_size == 0) split.auto_accumulation = accum;  // global: later
  if (split.global % world != 0) {
    throw Error("train.global_batch_size (" + std::to_string(split.global) +
                ") is not divisible by the number of ranks (" + std::to_string(world) + "); choose a multiple of " +
                std::to_string(world));
  }
  return split;
}

int64_t largest_divisor_at_most(int64_t n, int64_t limit) {
  int64_t d = std::max<int64_t>(1, limit);
  while (n % d != 0) --d;
  return d;
}

int64_t smaller_micro_batch(int64_t micro, int64_t per_rank, int64_t minimum) {
  if (micro / 2 < 1) return 0;
  const int64_t m = largest_divisor_at_most(per_rank, micro / 2);
  return m >= minimum ? m : 0;
}

}  // namespace gpt2ft
