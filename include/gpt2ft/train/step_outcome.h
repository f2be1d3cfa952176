// What every rank must agree on once the forward and backward passes of a step are done, so
// that all take the same branch: did any rank run out of memory, did any receive a stop
// signal, is any past train.time_limit. One host-side all-reduce on the control group (no GPU
// synchronisation); with one process it is the process's own view.
#pragma once

#include "gpt2ft/distributed/communicator.h"

namespace gpt2ft {

struct StepOutcome {
  bool out_of_memory = false;
  int stop_signal = 0;  // a signal number, 0 when none
  bool out_of_time = false;

  bool stop_requested() const { return stop_signal != 0 || out_of_time; }
};

// Collective: every rank hands in its own outcome and receives the union.
StepOutcome agree_on_step(Communicator& comm, const StepOutcome& mine);

}  // namespace gpt2ft
