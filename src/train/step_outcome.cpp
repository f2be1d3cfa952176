// The per-step agreement between ranks.
#include "gpt2ft/train/step_outcome.h"

namespace gpt2ft {

StepOutcome agree_on_step(Communicator& comm, const StepOutcome& mine) {
  const std::vector<int64_t> agreed =
      comm.agree_max({mine.out_of_memory ? 1 : 0, mine.stop_signal, mine.out_of_time ? 1 : 0}, "the step's outcome");
  return {agreed[0] != 0, static_cast<int>(agreed[1]), agreed[2] != 0};
}

}  // namespace gpt2ft
