// Metrics: metrics.jsonl, console lines and the progress bar.
#include "gpt2ft/train/metrics_log.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include <spdlog/spdlog.h>

namespace gpt2ft {

double unix_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

double model_flops_per_token(const GPT2Config& c, int64_t seq_len) {
  const double n = static_cast<double>(c.num_parameters() - c.n_positions * c.n_embd);
  return 6 * n + 12.0 * c.n_layer * c.n_embd * seq_len;
}

MetricsLog::MetricsLog(const std::filesystem::path& path, const std::string& progress, int64_t max_steps,
                       bool enabled, Rates rates, const std::filesystem::path& tensorboard_dir)
    : enabled_(enabled), max_steps_(max_steps), rates_(rates), start_(Clock::now()), interval_start_(start_) {
  if (enabled_) out_.open(path, std::ios::app);
  if (enabled_ && !tensorboard_dir.empty()) tensorboard_ = std::make_unique<TensorBoardWriter>(tensorboard_dir);
  bar_ = enabled_ && (progress == "bar" || (progress == "auto" && ::isatty(STDERR_FILENO)));
  last_loss_ = NAN;
}

void MetricsLog::start_interval() {
  interval_start_ = Clock::now();
  interval_steps_ = 0;
}

void MetricsLog::step_done(int64_t step, bool logged) {
  if (steps_before_ < 0) steps_before_ = step - 1;
  ++interval_steps_;
  if (!logged) progress(step);
}

void MetricsLog::write(const nlohmann::json& row) {
  if (!enabled_) return;
  out_ << row.dump() << "\n";
  out_.flush();
  clear_bar();
}

void MetricsLog::record_step(nlohmann::json row) {
  const double secs = std::chrono::duration<double>(Clock::now() - interval_start_).count();
  const double tokens_per_s = static_cast<double>(interval_steps_) * rates_.tokens_per_step / secs;
  row["tokens_per_s"] = tokens_per_s;
  row["step_ms"] = 1000 * secs / static_cast<double>(interval_steps_);
  if (rates_.peak_flops > 0) row["mfu"] = rates_.flops_per_token * tokens_per_s / rates_.peak_flops;
  start_interval();
  if (!enabled_) return;
  write(row);
  last_loss_ = row["loss"].get<double>();
  if (tensorboard_) {
    std::vector<std::pair<std::string, double>> scalars = {
        {"train/loss", last_loss_},
        {"train/learning_rate", row["lr"].get<double>()},
        {"train/grad_norm", row["grad_norm"].get<double>()},
        {"train/epoch", row["fractional_epoch"].get<double>()},
        {"train/tokens_per_second", tokens_per_s},
        {"train/micro_batch", row["micro_batch"].get<double>()}};
    if (row.contains("mfu")) scalars.emplace_back("train/mfu", row["mfu"].get<double>());
    for (const char* key : {"cuda_peak_allocated_gb", "cpu_peak_allocated_gb"}) {
      if (row.contains(key)) scalars.emplace_back("train/peak_memory_gib", row[key].get<double>() * 1e9 / (1 << 30));
    }
    if (row.contains("loss_scale")) scalars.emplace_back("train/loss_scale", row["loss_scale"].get<double>());
    for (const auto& [key, value] : row.items()) {  // DPO's metrics as TRL names them: train/rewards/chosen, ...
      if (key.rfind("rewards/", 0) == 0 || key.rfind("logps/", 0) == 0) scalars.emplace_back("train/" + key, value.get<double>());
    }
    tensorboard_->scalars(row["step"].get<int64_t>(), scalars);
  }
  std::string extra;
  if (row.contains("mfu")) extra += fmt::format(" | mfu {:.1f}%", 100 * row["mfu"].get<double>());
  if (row.contains("cuda_peak_allocated_gb")) {
    extra += fmt::format(" | mem {:.2f}/{:.2f} GB", row["cuda_peak_allocated_gb"].get<double>(),
                         row["cuda_peak_reserved_gb"].get<double>());
  }
  if (row.contains("cpu_peak_allocated_gb")) extra += fmt::format(" | mem {:.2f} GB", row["cpu_peak_allocated_gb"].get<double>());
  if (row.contains("loss_scale")) {
    extra += fmt::format(" | scale {:g} skipped {}", row["loss_scale"].get<double>(), row["skipped_steps"].get<int64_t>());
  }
  // DPO: TRL's reward accuracy and margin beside the loss.
  const std::string dpo = row.contains("rewards/accuracies")
                              ? fmt::format(" | reward accuracy {:.3f} margin {:.4f}",
                                            row["rewards/accuracies"].get<double>(), row["rewards/margins"].get<double>())
                              : "";
  spdlog::info("step {:>6}/{} | loss {:.4f}{} | lr {:.3e} | norm {:.3f} | {:.0f} tok/s | {:.0f} ms{}",
               row["step"].get<int64_t>(), max_steps_, last_loss_, dpo, row["lr"].get<double>(),
               row["grad_norm"].get<double>(), tokens_per_s, row["step_ms"].get<double>(), extra);
}

void MetricsLog::record_event(const nlohmann::json& row) {
  if (enabled_) write(row);
}

void MetricsLog::record_fresh_start(int64_t step) {
  if (enabled_ && tensorboard_) tensorboard_->restart(step + 1);
}

void MetricsLog::record_resume(int64_t step, const nlohmann::json& resumed) {
  if (!enabled_) return;
  write({{"time", unix_time()}, {"resumed", resumed}});
  if (tensorboard_) tensorboard_->restart(step + 1);
}

void MetricsLog::record_validation(const nlohmann::json& row) {
  if (!enabled_) return;
  write(row);
  if (tensorboard_) {
    std::vector<std::pair<std::string, double>> scalars = {{"eval/loss", row["val_loss"].get<double>()}};
    for (const auto& [key, value] : row.items()) {  // DPO: eval/rewards/accuracies, ...
      if (key.rfind("val_rewards/", 0) == 0 || key.rfind("val_logps/", 0) == 0) {
        scalars.emplace_back("eval/" + key.substr(4), value.get<double>());
      }
    }
    tensorboard_->scalars(row["step"].get<int64_t>(), scalars);
  }
  if (row.contains("val_rewards/accuracies")) {
    spdlog::info("step {:>6} | val DPO loss {:.4f} | val reward accuracy {:.3f} | val reward margin {:.4f}",
                 row["step"].get<int64_t>(), row["val_loss"].get<double>(),
                 row["val_rewards/accuracies"].get<double>(), row["val_rewards/margins"].get<double>());
  } else {
    spdlog::info("step {:>6} | val loss {:.4f} | val perplexity {:.2f}", row["step"].get<int64_t>(),
                 row["val_loss"].get<double>(), row["val_perplexity"].get<double>());
  }
}

// A one-line bar with the last logged loss; no host sync.
void MetricsLog::progress(int64_t step) {
  if (!bar_) return;
  const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
  const int64_t ran = step - std::max<int64_t>(0, steps_before_);  // steps this process ran
  const double eta = ran > 0 ? elapsed / static_cast<double>(ran) * static_cast<double>(max_steps_ - step) : 0;
  const int width = 30, filled = static_cast<int>(width * step / std::max<int64_t>(1, max_steps_));
  std::fprintf(stderr, "\r[%s%s] %lld/%lld loss %.4f ETA %02d:%02d   ", std::string(filled, '#').c_str(),
               std::string(width - filled, '.').c_str(), static_cast<long long>(step),
               static_cast<long long>(max_steps_), last_loss_, static_cast<int>(eta) / 60, static_cast<int>(eta) % 60);
  std::fflush(stderr);
  drawn_ = true;
}

void MetricsLog::clear_bar() {
  if (drawn_) std::fprintf(stderr, "\r%80s\r", "");
  drawn_ = false;
}

}  // namespace gpt2ft
