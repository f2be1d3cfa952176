// The training run behind `gpt2-finetune --config run.json`: model, data, optimizer, mixed
// precision, the step loop, evaluation, metrics, checkpoints and the final model folder.
//
// The pieces, one file each under train/: batch_split (global = micro x accumulation x
// ranks), optimizer (the interface the step calls; adamw, distributed/optimizer_shards),
// grad_scaler, lr_schedule, step_outcome (what the ranks agree on after each step),
// oom_backoff (oom.policy), stop_signals, metrics_log, validation, run_checkpoints (resume
// and save) and run_memory (the planner for a config, "auto" micro batch).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>

#include "gpt2ft/memory/run_memory.h"
#include "gpt2ft/train/config.h"
#include "gpt2ft/train/metrics_log.h"

namespace gpt2ft {

struct TrainSummary {
  int64_t steps = 0;            // optimizer steps completed in total
  int64_t micro_batch = 0;
  int64_t accumulation = 0;
  double first_loss = 0;        // train loss of the first logged step
  double last_loss = 0;         // and of the last
  std::optional<double> val_loss;
  double seconds = 0;
  std::filesystem::path final_model;
};

// How a run ends beyond what its config says: for runs that are a means, not the user's run.
struct RunEnd {
  bool save_final_model = true;  // false: no <output_dir>/final (plan --measure's three steps)
};

// Trains as the config says (resuming per checkpoint.resume). A deliberate stop (out of
// memory under oom.policy "checkpoint_and_exit", a stop signal, train.time_limit) throws
// ExitRequest with its exit code after writing a checkpoint; bad input throws Error.
TrainSummary run_training(const TrainConfig& config, const RunEnd& end = {});

}  // namespace gpt2ft
