// The training run behind `gpt2-finetune --config run.json`: model, data, optimizer, mixed
// precision, the step loop, evaluation, metrics, and the final model folder.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>

#include "gpt2ft/model/config.h"
#include "gpt2ft/train/config.h"
#include "gpt2ft/train/memory_planner.h"

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

TrainSummary run_training(const TrainConfig& config);

// The memory planner's view of a config: model shape (read from model.init_from's
// config.json or the preset, with the config's vocabulary resize and dropout), T, AMP,
// checkpointing, frozen parameters and the global batch, for `world_size` ranks. Loads no
// weights.
MemoryPlanInput memory_plan_input(const TrainConfig& config, int64_t world_size = 1);

// Model FLOPs per trained token: 6 * (parameters without position embeddings) for the
// matmuls forward and backward, plus 12 * L * C * T for attention (QK^T and AV, as in PaLM).
double model_flops_per_token(const GPT2Config& config, int64_t seq_len);

}  // namespace gpt2ft
