// Stop requests from outside: SIGTERM, SIGINT and SIGUSR1 (Slurm's --signal=USR1@120 before
// the time limit, preemption) ask the run to stop with a checkpoint: at the next step
// boundary, or in one process mid-step by dropping the step, or during setup with nothing new
// to save. A second stop signal of any kind ends the process at once.
#pragma once

#include <signal.h>

namespace gpt2ft {

// Installs the handlers for its lifetime (the previous ones come back afterwards).
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // The last stop signal received since construction, or 0.
  static int requested();

 private:
  static constexpr int kSignals[3] = {SIGTERM, SIGINT, SIGUSR1};
  struct sigaction previous_[3];
};

}  // namespace gpt2ft
