// Validation during training: the first eval.max_sequences windows of data.val (all by
// default), eval.batch_size per batch (by default the training micro batch), under the run's
// autocast. The set never depends on the batch or the ranks, so losses compare across an
// out-of-memory back-off or a resume on another number of GPUs. When an
// evaluation ran out of memory and went on with smaller forward passes, the next one starts
// from what fitted. Collective with several ranks (each evaluates its share).
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "gpt2ft/distributed/communicator.h"
#include "gpt2ft/eval/evaluate.h"
#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/train/config.h"
#include "gpt2ft/train/preference_reference.h"

namespace gpt2ft {

class Validation {
 public:
  // reference: DPO, whose validation is the preference loss and reward accuracy of data.val's
  // pairs against it (else null: the mean next-token loss).
  Validation(const TrainConfig& config, int64_t micro_batch, c10::ScalarType amp, Communicator& comm,
             c10::Device device, PreferenceReference* reference = nullptr);

  // The model's validation loss (it is left in training mode); nullopt without data.val.
  std::optional<EvalResult> run(GPT2& model);
  // The training micro batch changed (an out-of-memory back-off): when eval.batch_size is 0
  // it is the evaluation's batch too.
  void training_micro_batch_changed(int64_t micro_batch);

 private:
  EvalResult run_pairs(GPT2& model);

  const TrainConfig& config_;
  PreferenceReference* reference_;
  std::unique_ptr<Samples> pairs_;  // data.val's pairs (DPO)
  std::vector<std::filesystem::path> shards_;
  EvalOptions options_;
  c10::Device device_;
  bool described_ = false;  // the set was logged
};

}  // namespace gpt2ft
