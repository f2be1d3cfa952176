// What would make a run fit, for `gpt2-finetune plan`: the memory levers, each applied alone
// to the config and planned, in order of cost (the chunked loss, autocast, smaller micro
// batches with accumulation, checkpointing every 2nd block then all, 8-bit AdamW, optimizer
// offload, ZeRO-1, then what changes the training: LoRA, freezing, shorter samples), with the
// predicted peak, the largest micro batch that fits and what the lever costs. The cheapest
// that fits alone is the recommendation; when none does, levers are combined in that order
// until the micro batch fits.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gpt2ft/train/config.h"

namespace gpt2ft {

struct MemoryLever {
  std::string name;                   // what it is, in words
  std::vector<std::string> settings;  // --set overrides (and "--gpus N" for ZeRO-1); a run resumes with them
  std::string cost;                   // what it costs
  bool keeps_full_fine_tune = true;   // false: it changes what is trained
  // false: it makes another run (other samples: data.seq_len; another trained set: LoRA), which
  // cannot continue a checkpoint's state: a new run from its weights in another output_dir.
  bool resumable = true;
  // The combination's settings of the levers that are not resumable (its `settings` hold the
  // rest); a single lever's all stay in `settings`.
  std::vector<std::string> new_run_settings = {};
  int64_t world_size = 1;             // GPUs it assumes
  int64_t micro_batch = 0;            // the micro batch it runs at (a smaller one, with accumulation); 0: the advice's
  int64_t peak = 0;                   // predicted at its micro batch
  int64_t largest_micro_batch = 0;    // in the budget
};

struct MemoryAdvice {
  int64_t micro_batch = 0;        // the one the levers are judged at
  int64_t budget = 0;
  std::vector<MemoryLever> single;  // each alone: those that fit, cheapest first, then those that only help
  // The recommendation: the cheapest single lever that fits, else levers added in order of
  // cost until the micro batch fits (its settings accumulate).
  MemoryLever combined;
  bool combined_fits = false;       // combined reaches the micro batch

  nlohmann::json to_json() const;
};

// "512 MiB" below 1 GiB, "13.6 GiB" from there: memory as plan and its advice print it.
std::string format_memory(int64_t bytes);

// Whether the lever reaches `micro` (or its own smaller micro batch) in the budget.
bool lever_fits(const MemoryLever& lever, int64_t micro);

// " --set a --set b": settings as a command line's flags.
std::string set_flags(const std::vector<std::string>& settings);

// settings, then new_run_settings: everything the lever sets.
std::vector<std::string> all_settings(const MemoryLever& lever);

// `config` on `world_size` GPUs does not reach `micro_batch` in `budget` bytes: the advice.
MemoryAdvice memory_levers(const TrainConfig& config, int64_t world_size, int64_t micro_batch, int64_t budget);

}  // namespace gpt2ft
