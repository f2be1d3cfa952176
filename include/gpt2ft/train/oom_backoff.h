// What a run does when a step ran out of GPU memory on some rank (oom.policy), once every
// rank has dropped the step's partial gradients:
//   "backoff"              redo the step from its first sample with a smaller micro batch
//                          (the largest divisor of the per-rank batch at most half the old
//                          one), the accumulation raised to keep the global batch;
//   "checkpoint_and_exit"  checkpoint the last completed step and exit 75, naming the micro
//                          batch to continue with;
// and whatever the policy, when the micro batch cannot go lower: checkpoint and exit 77 (a
// rerun would fail the same way, so job wrappers must not requeue it) with plan's advice;
//   "fail"                 stop with an error.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "gpt2ft/core/error.h"
#include "gpt2ft/train/batch_split.h"
#include "gpt2ft/train/config.h"

namespace gpt2ft {

struct OomDecision {
  bool exit = false;       // checkpoint and exit 75 (the restart continues with next_micro)
  int64_t next_micro = 0;  // the micro batch to redo the step with, or to restart with
  bool lowered = false;    // next_micro is below the failed one
};

class OomBackoff {
 public:
  explicit OomBackoff(const TrainConfig::Oom& options) : options_(options) {}

  // `step` is the 0-based index of the step that failed with `split`; `why` the error. Throws
  // Error under the policy "fail".
  OomDecision decide(int64_t step, const BatchSplit& split, const std::string& why) const;
  // The warning logged when the step is redone with decision.next_micro.
  std::string backoff_warning(int64_t step, const BatchSplit& failed, const OomDecision& decision,
                              const std::string& why) const;
  // The exit after the checkpoint `saved` of the last completed step: 75 to continue with the
  // lowered micro batch, 77 when it could not be lowered (`advice`: what would make it fit).
  ExitRequest exit_request(int64_t step, const BatchSplit& failed, const OomDecision& decision,
                           const std::filesystem::path& saved, const std::string& advice = "") const;

 private:
  TrainConfig::Oom options_;
};

}  // namespace gpt2ft
