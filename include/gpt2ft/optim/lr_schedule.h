// Learning-rate schedules: linear warmup from 0, then constant, linear or cosine decay to
// min_lr at max_steps. Computed on the host: no device work per step.
#pragma once

#include <cstdint>
#include <string>

namespace gpt2ft {

struct LrSchedule {
  std::string kind = "cosine";  // "constant" | "linear" | "cosine"
  double lr = 3e-4;
  double min_lr = 0.0;
  int64_t warmup_steps = 0;
  int64_t max_steps = 1;

  // The learning rate of optimizer step `step` (0-based).
  double at(int64_t step) const;
};

}  // namespace gpt2ft
