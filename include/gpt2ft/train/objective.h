// What a training step minimises. The step (train/trainer.cpp) asks its objective for the
// divisor of the global batch and for each micro batch's share of the loss, and backpropagates
// that; the objective knows nothing of micro batches, ranks or out-of-memory back-off beyond
// the counts the step hands it.
//
//   language model   plain text shards: every token is a target; a micro batch's share is
//                    its mean loss over B*T / the accumulation steps
//   completion       document shards (prompt/completion pairs, conversations): only target
//                    tokens count; a micro batch's share is its summed target loss / (the
//                    global batch's target count / ranks), so that the shares of every micro
//                    batch of every rank sum to the global batch's mean over its targets
//
//   preference       preference shards (DPO): each example a (chosen, rejected) pair of rows;
//                    the policy's per-row log-prob sums against the reference's
//                    (train/preference_reference.h) give train/preference_loss.h's loss; a
//                    micro batch's share is its summed loss over its pairs / (the global
//                    batch's pairs / ranks). It also sums TRL's metrics over its pairs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

#include "gpt2ft/data/loader.h"
#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/train/preference_loss.h"
#include "gpt2ft/train/preference_reference.h"

namespace gpt2ft {

struct ObjectiveLoss {
  torch::Tensor loss;     // () this micro batch's share of the loss, differentiable
  torch::Tensor metrics;  // (M) detached sums over its examples of metric_names(), or undefined
};

class Objective {
 public:
  virtual ~Objective() = default;

  // Whether the divisor needs the global batch's target count (counted before the step).
  virtual bool counts_targets() const = 0;
  // The divisor of each micro batch's summed loss: `targets` is the global batch's target
  // count (counts_targets() only), over `world` ranks of `accumulation` micro batches each.
  virtual double divisor(int64_t accumulation, int64_t world, int64_t targets) const = 0;
  // One micro batch's share of the loss, () on the batch's device, and its metrics' sums.
  virtual ObjectiveLoss loss(GPT2& model, const Batch& batch, double divisor) const = 0;
  // What loss() sums beside the loss; the last name counts the examples the others are
  // averaged over. Empty: no metrics.
  virtual std::vector<std::string> metric_names() const { return {}; }
};

// The language-model objective for plain text, the completion objective for document shards;
// chunked: lm_head + cross-entropy in chunks (train.chunked_loss), else the eager loss.
std::unique_ptr<Objective> make_objective(bool document_shards, bool chunked);
// DPO over a global batch of `global_pairs` examples; the reference outlives the objective.
std::unique_ptr<Objective> make_preference_objective(const PreferenceLossOptions& options, bool chunked,
                                                     int64_t global_pairs, PreferenceReference& reference);
// TRL's metric names, in the order of a preference objective's sums (the last: "pairs").
std::vector<std::string> preference_metric_names();
// (2B) log-prob sums -> the (B) chosen and rejected halves, divided by each row's target count
// `counts` (2B) for "ipo" (TRL's mean over the continuation's tokens; unused by the others).
PreferenceLoss preference_loss_of_rows(const torch::Tensor& policy, const torch::Tensor& reference,
                                       const torch::Tensor& counts, const PreferenceLossOptions& options);
// (2B) float32: the targets of each row of a batch of pairs.
torch::Tensor row_target_counts(const Batch& batch);

}  // namespace gpt2ft
