// Fault-injection hooks.
#include "gpt2ft/core/fault_injection.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include <c10/util/Exception.h>

namespace gpt2ft {

void maybe_inject_oom(int64_t sequences) {
  static const char* env = std::getenv("GPT2FT_FAULT_OOM_ABOVE_MICRO");
  if (env && sequences > std::atoll(env)) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, "fault injection: CUDA out of memory at batch ", sequences,
                     " (GPT2FT_FAULT_OOM_ABOVE_MICRO=", env, ")");
  }
}

void maybe_crash_after_step(int64_t step) {
  static const char* env = std::getenv("GPT2FT_FAULT_CRASH_AFTER_STEP");
  if (env && step == std::atoll(env)) {
    std::fprintf(stderr, "fault injection: crashing after step %lld\n", static_cast<long long>(step));
    ::_exit(137);
  }
}

bool nan_loss_at_step(int64_t step) {
  static const char* env = std::getenv("GPT2FT_FAULT_NAN_AT_STEP");
  return env && step == std::atoll(env);
}

void checkpoint_kill_point() {
  static const char* env = std::getenv("GPT2FT_FAULT_CRASH_IN_CHECKPOINT");
  static int64_t count = 0;
  if (env && ++count == std::atoll(env)) {
    std::fprintf(stderr, "fault injection: crashing at checkpoint kill point %lld\n", static_cast<long long>(count));
    ::_exit(137);
  }
}

}  // namespace gpt2ft
