// A run's checkpoints as the trainer uses them (the format is train/checkpoint.h): resuming,
// which reconciles the checkpoint with the config (same global batch; a micro batch lowered
// after running out of memory is kept; another number of ranks recomputes the split), and
// writing one collectively (every rank's RNG state goes in, rank 0 writes, all wait for it).
#pragma once

#include <filesystem>
#include <string>
#include <vector>
#include <optional>

#include <c10/core/Device.h>

#include "gpt2ft/distributed/communicator.h"
#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/optim/grad_scaler.h"
#include "gpt2ft/optim/optimizer.h"
#include "gpt2ft/train/batch_split.h"
#include "gpt2ft/train/checkpoint.h"
#include "gpt2ft/train/config.h"

namespace gpt2ft {

class RunCheckpoints {
 public:
  RunCheckpoints(const TrainConfig& config, Communicator& comm, c10::Device device);

  // Restores model, optimizer, loss scale and RNG from the checkpoint checkpoint.resume
  // names (or none), and settles the split's micro batch. Returns the state to continue from
  // (a fresh one without a checkpoint). Errors name the checkpoint and what differs.
  TrainingState resume(GPT2& model, Optimizer& optimizer, GradScaler* scaler, BatchSplit& split);

  // Collective. Writes `state` (with the model, optimizer state and every rank's RNG) and
  // returns its folder.
  std::filesystem::path save(const TrainingState& state, GPT2& model, const Optimizer& optimizer,
                             const GradScaler* scaler);

 private:
  // The settings that changed in ways a resume converts (empty when none); throws when the
  // checkpoint is of another run and checkpoint.resume is "auto".
  std::vector<std::string> check_same_run(const std::filesystem::path& from, const nlohmann::json& now) const;

  const TrainConfig& config_;
  Communicator& comm_;
  c10::Device device_;
};

}  // namespace gpt2ft
