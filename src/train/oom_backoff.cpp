// Out-of-memory policy.
#include "gpt2ft/train/oom_backoff.h"

#include <fmt/format.h>

namespace gpt2ft {
namespace {

// What to do when the micro batch is not the problem.
constexpr const char* kPlanHint =
    "`gpt2-finetune plan --config <this config>` lists what would make it fit (activation checkpointing, bf16, "
    "optimizer offload, ZeRO-1, LoRA, freezing, shorter samples), cheapest first, with the settings to use";

}  // namespace

OomDecision OomBackoff::decide(int64_t step, const BatchSplit& split, const std::string& why) const {
  if (options_.policy == "fail") {
    throw Error("out of memory at micro batch " + std::to_string(split.micro) + " (step " + std::to_string(step + 1) +
                "): " + why + ". Lower train.micro_batch_size or set oom.policy \"backoff\"; " + kPlanHint);
  }
  const int64_t smaller = smaller_micro_batch(split.micro, split.per_rank(), options_.min_micro_batch_size);
  OomDecision d;
  d.lowered = smaller != 0;
  d.next_micro = smaller ? smaller : split.micro;
  d.exit = options_.policy == "checkpoint_and_exit" || !d.lowered;
  return d;
}

std::string OomBackoff::backoff_warning(int64_t step, const BatchSplit& failed, const OomDecision& decision,
                                        const std::string& why) const {
  const int64_t m = decision.next_micro;
  return fmt::format(
      "OUT OF MEMORY at step {} with micro batch {} ({}): backing off to micro batch {} x accumulation {}{} "
      "(global batch {} unchanged) and redoing the step from its first sample",
      step + 1, failed.micro, why, m, failed.per_rank() / m, failed.world > 1 ? fmt::format(" x {} ranks", failed.world) : "",
      failed.global);
}

ExitRequest OomBackoff::exit_request(int64_t step, const BatchSplit& failed, const OomDecision& decision,
                                     const std::filesystem::path& saved, const std::string& advice) const {
  const std::string what = "out of memory at step " + std::to_string(step + 1) + " with micro batch " +
                           std::to_string(failed.micro) + "; saved " + saved.string() + " (step " +
                           std::to_string(step) + "). ";
  if (decision.lowered) {
    return ExitRequest(kExitOomRestart, what + "Run again with checkpoint.resume \"auto\": it continues with micro batch " +
                                            std::to_string(decision.next_micro) + " and the same global batch " +
                                            std::to_string(failed.global));
  }
  return ExitRequest(kExitCannotFit, what + "The run cannot fit even at the smallest micro batch (oom.min_micro_batch_size " +
                                         std::to_string(options_.min_micro_batch_size) + "), so running it again as it is "
                                         "would fail the same way: " + kPlanHint +
                                         (advice.empty() ? "; with more memory, run again (it resumes from the checkpoint)"
                                                         : ". " + advice));
}

}  // namespace gpt2ft
