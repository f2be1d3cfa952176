// What defines a run's trajectory, recorded in every checkpoint so that a resume never
// silently continues another run: the model it started from (path and the weights' identity),
// the adapter it continues, the training shards (names, sizes, contents sampled), the
// tokenizers, and the settings that change the maths (lr and its schedule, AdamW, clipping,
// seeds, sequence length, freezing, LoRA, dropout, autocast dtype).
//
// Not part of it, so free to change on resume: the micro batch (the out-of-memory restart),
// max_steps / epochs, time_limit, logging, evaluation and checkpoint cadence, the number of
// ranks, activation checkpointing, optimizer offload, fused AdamW (equal maths), the device.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gpt2ft/train/config.h"

namespace gpt2ft {

// A flat JSON object: "path" -> readable string value.
nlohmann::json run_fingerprint(const TrainConfig& cfg);

// The shards of a glob (`what`: its JSON path), as the fingerprint identifies data.train's:
// names, sizes and sampled contents. A glob that matches nothing gives "(no shards)".
std::string shards_identity(const std::string& pattern, const std::string& what);

// What differs between a checkpoint's fingerprint and this run's, in two parts. `resumable`:
// the changes a resume converts or allows, the memory levers of an out-of-memory exit's advice
// that change what the fingerprint records: amp.dtype (float16 then starts its loss scale
// afresh), train.optimizer between AdamW and 8-bit AdamW and train.adamw_8bit.embeddings (the
// moments converted at load), and more frozen blocks or frozen embeddings (their optimizer
// state dropped, their weights kept); one line each for the log and the metrics' resumed row.
// `other`: every other difference (fingerprint_differences' lines), which makes another run.
struct FingerprintChanges {
  std::vector<std::string> resumable;
  std::vector<std::string> other;
};
FingerprintChanges classify_fingerprint_changes(const nlohmann::json& saved, const nlohmann::json& now);

// One line per field that differs ("data.train shards: was ..., now ..."); empty when equal.
// A field the saved fingerprint lacks is a difference, and so is a saved fingerprint that is
// empty or not an object: a damaged fingerprint must not turn the check off.
std::vector<std::string> fingerprint_differences(const nlohmann::json& saved, const nlohmann::json& now);

}  // namespace gpt2ft
