// Failures on purpose, for the resilience tests (README: "For developers: fault injection").
// Each hook does nothing unless its environment variable is set.
#pragma once

#include <cstdint>

namespace gpt2ft {

// GPT2FT_FAULT_OOM_ABOVE_MICRO=K: a forward pass over more than K sequences (training's micro
// batches and evaluation's batches) throws c10::OutOfMemoryError, as CUDA's allocator does.
void maybe_inject_oom(int64_t sequences);

// GPT2FT_FAULT_CRASH_AFTER_STEP=N: the process ends abruptly (_exit 137) right after
// optimizer step N and any checkpoint due at N.
void maybe_crash_after_step(int64_t step);

// GPT2FT_FAULT_NAN_AT_STEP=N: optimizer step N's loss (and so its gradients) is NaN, as a
// diverging run's would be.
bool nan_loss_at_step(int64_t step);

// GPT2FT_FAULT_CRASH_IN_CHECKPOINT=K: the process ends (_exit 137) at the K-th kill point
// inside checkpoint writing (counted over the whole run, from 1).
void checkpoint_kill_point();

}  // namespace gpt2ft
