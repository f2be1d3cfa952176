// Training checkpoints: everything needed to continue a run exactly.
//
//   <output_dir>/checkpoints/step_00000120/
//       model.safetensors, config.json   the model, loadable by transformers
//       trainer_state.safetensors        AdamW moments and step counts, loss scale, RNG states
//       trainer_state.json               step, loader position, batch split, the run's config
//   <output_dir>/checkpoints/latest      the name of the newest complete checkpoint
//
// A checkpoint is written into a temporary folder, fsync'd, renamed into place, and only then
// does `latest` move to it (itself written atomically); older ones are pruned last. A crash
// at any instant leaves the previous checkpoint usable, and a partial one is never chosen.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "gpt2ft/data/loader.h"
#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/optim/grad_scaler.h"
#include "gpt2ft/optim/optimizer.h"
#include "gpt2ft/train/config.h"

namespace gpt2ft {

struct TrainingState {
  int64_t step = 0;          // optimizer steps completed
  LoaderState loader;        // the samples they consumed
  int64_t micro_batch = 0;   // in use when saved
  int64_t global_batch = 0;  // sequences per optimizer step
  bool micro_batch_from_oom = false;  // the micro batch was lowered after an out-of-memory error
  int64_t world_size = 1;    // ranks of the run that wrote it (micro_batch is per rank)
  bool rng_restored = true;  // this rank's RNG state came from a checkpoint
  std::optional<double> best_val_loss;     // the lowest validation loss so far
  int64_t best_step = 0;                   // the step it was measured at
  int64_t evals_without_improvement = 0;   // early stopping's count
  std::filesystem::path source;  // the checkpoint it was read from (empty for a fresh run)
  nlohmann::json fingerprint;    // what defines the run (run_fingerprint); null in older checkpoints
  std::vector<std::string> changed_settings;  // on resume: what this run changed (a memory lever's conversion)
};

// Writes a checkpoint of `state` under run_dir/checkpoints and prunes to keep_last.
// `optimizer_state` is the optimizer's checkpoint_state() (all of it, gathered from every
// rank when it is sharded). The RNG states saved are this process's; `rank_rng` adds other ranks'
// (rng_key_of_rank names).
std::filesystem::path save_checkpoint(const std::filesystem::path& run_dir, const TrainingState& state, GPT2& model,
                                      const NamedTensors& optimizer_state, const GradScaler* scaler,
                                      const TrainConfig& config, int64_t keep_last, const NamedTensors& rank_rng = {});

// The fields of a parsed trainer_state.json (`file` names it in errors), each checked for
// presence, type and range: a damaged or edited file is an Error naming the field, never a
// resume into nonsense.
TrainingState parse_training_state(const nlohmann::json& meta, const std::filesystem::path& file);

// run_dir/checkpoints/step_NNNNNNNN, the folder of the checkpoint after `step` steps.
std::filesystem::path checkpoint_folder(const std::filesystem::path& run_dir, int64_t step);

// The key of rank r's RNG state for `device_type` ("cpu" or "cuda") in trainer_state.
std::string rng_key_of_rank(int rank, const std::string& device_type);

// The checkpoint `latest` names, if there is one. A `latest` naming a missing folder is an Error.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& run_dir);

// The state trainer_state.json of `dir` records (nothing else is read or checked).
TrainingState read_checkpoint_state(const std::filesystem::path& dir);

// Restores model weights, optimizer and scaler state and the RNG states from `dir`, checking
// that it matches the model and optimizer built from the current config. Returns the state.
// Rank r restores its own RNG state when the checkpoint has one (same world size);
// otherwise rng_restored is false and the caller reseeds.
TrainingState load_checkpoint(const std::filesystem::path& dir, GPT2& model, Optimizer& optimizer, GradScaler* scaler,
                              int rank = 0, int world_size = 1);

}  // namespace gpt2ft
