// Metrics of a training run: one JSON object per log step and per evaluation in
// <output_dir>/metrics.jsonl, the same as TensorBoard scalars under <output_dir>/tensorboard
// (HF Trainer's tags: train/loss, train/learning_rate, train/grad_norm, train/epoch, eval/loss;
// and train/tokens_per_second, train/mfu, train/peak_memory_gib, train/micro_batch,
// train/loss_scale), and on the console a line per log step or, on a terminal, a progress bar
// in between. It times the interval since the last log step itself, so the trainer's step loop
// reads no clock and syncs nothing between log steps.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include <memory>

#include "gpt2ft/io/tensorboard_events.h"
#include "gpt2ft/model/config.h"

namespace gpt2ft {

// Model FLOPs per trained token: 6 * (parameters without position embeddings) for the
// matmuls forward and backward, plus 12 * L * C * T for attention (QK^T and AV, as in PaLM).
double model_flops_per_token(const GPT2Config& config, int64_t seq_len);

// Seconds since the Unix epoch, for the rows' "time".
double unix_time();

class MetricsLog {
 public:
  struct Rates {
    double tokens_per_step = 0;  // global batch x T
    double flops_per_token = 0;  // for MFU
    double peak_flops = 0;       // of all GPUs together; 0: no MFU
  };
  // Disabled (ranks other than 0), it writes nothing. With a tensorboard_dir, a new event file
  // there.
  MetricsLog(const std::filesystem::path& path, const std::string& progress, int64_t max_steps, bool enabled,
             Rates rates, const std::filesystem::path& tensorboard_dir = {});

  // Starts the timed interval (before the first step).
  void start_interval();
  // A step finished: counts it, and draws the progress bar unless the step is logged.
  void step_done(int64_t step, bool logged);
  // A log step: adds tokens_per_s, step_ms (and mfu) over the interval to `row`, writes and
  // prints it, and starts the next interval.
  void record_step(nlohmann::json row);
  // An evaluation's row (val_loss, val_perplexity, ...).
  void record_validation(const nlohmann::json& row);
  // Any other row, written as it is (e.g. {"early_stop": {...}}).
  void record_event(const nlohmann::json& row);
  // The run continues from a checkpoint of `step` steps: a {"resumed": ...} row, and in
  // TensorBoard a restart there, so the steps after it replace what an earlier attempt logged.
  void record_resume(int64_t step, const nlohmann::json& resumed);
  // A run that starts afresh from `step` (0): in TensorBoard a restart at its first step, so an
  // earlier run's event files in the same folder do not show beside it.
  void record_fresh_start(int64_t step);
  void clear_bar();

 private:
  void write(const nlohmann::json& row);
  void progress(int64_t step);
  using Clock = std::chrono::steady_clock;
  bool enabled_;
  std::ofstream out_;
  int64_t max_steps_;
  Rates rates_;
  Clock::time_point start_, interval_start_;
  int64_t interval_steps_ = 0;
  bool bar_ = false, drawn_ = false;
  double last_loss_ = 0;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
  int64_t steps_before_ = -1;  // the step this process started after (a resumed run's ETA counts from it)
};

}  // namespace gpt2ft
