// Resuming and writing a run's checkpoints.
#include "gpt2ft/train/run_checkpoints.h"

#include <spdlog/spdlog.h>

#include "gpt2ft/core/error.h"
#include "gpt2ft/core/rng_state.h"
#include "gpt2ft/train/run_fingerprint.h"

namespace gpt2ft {
namespace fs = std::filesystem;

RunCheckpoints::RunCheckpoints(const TrainConfig& config, Communicator& comm, c10::Device device)
    : config_(config), comm_(comm), device_(device) {}

// A checkpoint found in output_dir must be of this run: the same model, data and settings
// (run_fingerprint), but for the memory levers a resume converts (classify_fingerprint_changes),
// which are logged and returned. "auto" refuses another run's; "continue" and an explicit
// checkpoint folder (deliberate choices) take it with a warning that lists what changed.
std::vector<std::string> RunCheckpoints::check_same_run(const fs::path& from, const nlohmann::json& now) const {
  const TrainingState saved = read_checkpoint_state(from);
  if (saved.fingerprint.is_null()) {
    spdlog::warn("{} was written by an older gpt2-finetune without a run fingerprint: cannot check that it is of "
                 "this model, data and settings", from.string());
    return {};
  }
  const FingerprintChanges changes = classify_fingerprint_changes(saved.fingerprint, now);
  for (const auto& c : changes.resumable) spdlog::info("resuming {} with a changed setting: {}", from.string(), c);
  if (changes.other.empty()) return changes.resumable;
  std::string list;
  for (const auto& c : changes.other) list += "\n  " + c;
  if (config_.checkpoint.resume == "auto") {
    throw Error(config_.output_dir + " holds a checkpoint of another run (" + from.string() +
                "), which checkpoint.resume \"auto\" would continue; what differs from this config:" + list +
                "\nUse a new output_dir to start this run, or set checkpoint.resume to \"continue\" to go on from that "
                "checkpoint with the new settings");
  }
  spdlog::warn("resuming {} although the run changed (checkpoint.resume \"{}\"):{}", from.string(),
               config_.checkpoint.resume, list);
  std::vector<std::string> all = changes.resumable;
  all.insert(all.end(), changes.other.begin(), changes.other.end());
  return all;
}

TrainingState RunCheckpoints::resume(GPT2& model, Optimizer& optimizer, GradScaler* scaler, BatchSplit& split) {
  // Every rank reads the checkpoint (the run folder is on a shared filesystem).
  std::optional<fs::path> from;
  if (config_.checkpoint.resume == "auto" || config_.checkpoint.resume == "continue") {
    from = latest_checkpoint(config_.output_dir);
  }
  else if (config_.checkpoint.resume != "none") from = fs::path(config_.checkpoint.resume);
  if (config_.checkpoint.resume == "none") {
    // A new run never writes among another run's checkpoints (checkpoint.keep_last would delete them).
    if (const auto found = latest_checkpoint(config_.output_dir)) {
      throw Error(config_.output_dir + " holds checkpoints of an earlier run (" + found->string() +
                  "); checkpoint.resume \"none\" starts a new run, which would write its checkpoints among them and "
                  "delete theirs. Choose another output_dir, move that folder away, or set checkpoint.resume "
                  "\"auto\" to continue that run");
    }
  }
  const nlohmann::json fingerprint = run_fingerprint(config_);
  TrainingState state;
  if (from) {
    const std::vector<std::string> changed = check_same_run(*from, fingerprint);
    state = load_checkpoint(*from, model, optimizer, scaler, comm_.rank(), static_cast<int>(split.world));
    state.changed_settings = changed;
    if (split.auto_accumulation > 0 && state.global_batch != split.global) {
      // "auto" with accumulation: the run's global batch is the one it started with.
      const int64_t picked = split.micro;
      split.global = state.global_batch;
      split.micro = largest_divisor_at_most(split.per_rank(), picked);
      spdlog::info("train.micro_batch_size \"auto\": the run's global batch is the checkpoint's, {}; micro batch {} "
                   "(this machine fits {})", split.global, split.micro, picked);
    }
    if (state.global_batch != split.global) {
      throw Error("checkpoint " + from->string() + " was trained with a global batch of " +
                  std::to_string(state.global_batch) + " sequences but the config asks for " +
                  std::to_string(split.global) + "; resuming would change the effective batch. Set "
                  "train.global_batch_size=" + std::to_string(state.global_batch) +
                  ", or another output_dir to start over");
    }
    if (state.micro_batch_from_oom && state.micro_batch < split.micro) {
      spdlog::warn("using micro batch {} from the checkpoint (lowered after running out of memory) instead of the "
                   "config's {}; the global batch stays {}",
                   state.micro_batch, split.micro, split.global);
      split.micro = state.micro_batch;
    }
    if (state.world_size != split.world) {
      spdlog::info("the checkpoint was written by {} rank(s), this run has {}: same global batch {} and sample order, "
                   "accumulation recomputed",
                   state.world_size, split.world, split.global);
    }
    spdlog::info("resumed from {} at step {} (epoch {}, sample {} of the epoch)", from->string(), state.step,
                 state.loader.epoch, state.loader.consumed);
  } else {
    state.rng_restored = false;  // nothing to restore: ranks other than 0 seed their own dropout
  }
  if (split.per_rank() % split.micro != 0) {
    if (!from || config_.train.global_batch_size == 0) {
      throw Error("train.global_batch_size (" + std::to_string(split.global) + ") is not divisible by the micro batch (" +
                  std::to_string(split.micro) + ")" +
                  (split.world > 1 ? " times the number of ranks (" + std::to_string(split.world) + ")" : ""));
    }
    // Resumed on another number of ranks: the largest micro batch below that fits.
    const int64_t was = split.micro;
    split.micro = largest_divisor_at_most(split.per_rank(), split.micro);
    spdlog::warn("micro batch {} does not divide the {} sequences per rank of {} ranks; using {}", was,
                 split.per_rank(), split.world, split.micro);
  }
  state.global_batch = split.global;
  state.world_size = split.world;
  state.fingerprint = fingerprint;  // what this run's checkpoints record from now on
  return state;
}

namespace {

// Every rank's RNG states for a checkpoint, under rng_key_of_rank (rank 0's are saved as the
// checkpoint's own).
NamedTensors gather_rank_rng(Communicator& comm, c10::Device device) {
  NamedTensors out;
  if (!comm.distributed()) return out;
  for (const auto& [d, mine] : get_rng_states(device)) {
    const std::string type = d.is_cpu() ? "cpu" : "cuda";
    const std::vector<torch::Tensor> all = comm.all_gather_bytes(mine, "RNG states");
    for (int r = 1; r < comm.world_size(); ++r) out.emplace_back(rng_key_of_rank(r, type), all[r]);
  }
  return out;
}

}  // namespace

fs::path RunCheckpoints::save(const TrainingState& state, GPT2& model, const Optimizer& optimizer,
                              const GradScaler* scaler) {
  const NamedTensors rank_rng = gather_rank_rng(comm_, device_);
  const NamedTensors optimizer_state = optimizer.checkpoint_state();
  if (comm_.is_main()) {
    save_checkpoint(config_.output_dir, state, model, optimizer_state, scaler, config_, config_.checkpoint.keep_last,
                    rank_rng);
  }
  comm_.barrier("checkpoint of step " + std::to_string(state.step));
  return checkpoint_folder(config_.output_dir, state.step);
}

}  // namespace gpt2ft
