// Learning-rate schedules.
#include "gpt2ft/optim/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace gpt2ft {

double LrSchedule::at(int64_t step) const {
  if (step < warmup_steps) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  if (kind == "constant") return lr;
  const int64_t decay_steps = std::max<int64_t>(1, max_steps - warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(decay_steps));
  const double factor = kind == "linear" ? 1.0 - progress : 0.5 * (1.0 + std::cos(M_PI * progress));
  return min_lr + (lr - min_lr) * factor;
}

}  // namespace gpt2ft
