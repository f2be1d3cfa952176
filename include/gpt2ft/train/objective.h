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
// Preference training (DPO, train/preference_loss.h) is to be a third.
#pragma once

#include <cstdint>
#include <memory>

#include <torch/types.h>

#include "gpt2ft/data/loader.h"
#include "gpt2ft/model/gpt2.h"

namespace gpt2ft {

class Objective {
 public:
  virtual ~Objective() = default;

  // Whether the divisor needs the global batch's target count (counted before the step).
  virtual bool counts_targets() const = 0;
  // The divisor of each micro batch's summed loss: `targets` is the global batch's target
  // count (counts_targets() only), over `world` ranks of `accumulation` micro batches each.
  virtual double divisor(int64_t accumulation, int64_t world, int64_t targets) const = 0;
  // One micro batch's share of the loss, () on the batch's device.
  virtual torch::Tensor loss(GPT2& model, const Batch& batch, double divisor) const = 0;
};

// The language-model objective for plain text, the completion objective for document shards;
// chunked: lm_head + cross-entropy in chunks (train.chunked_loss), else the eager loss.
std::unique_ptr<Objective> make_objective(bool document_shards, bool chunked);

}  // namespace gpt2ft
