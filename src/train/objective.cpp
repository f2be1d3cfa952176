// The language-model and completion objectives.
#include "gpt2ft/train/objective.h"

#include <torch/torch.h>

#include "gpt2ft/model/linear_cross_entropy.h"

namespace gpt2ft {
namespace {

class LanguageModel final : public Objective {
 public:
  explicit LanguageModel(bool chunked) : chunked_(chunked) {}
  bool counts_targets() const override { return false; }
  double divisor(int64_t accumulation, int64_t, int64_t) const override { return static_cast<double>(accumulation); }
  torch::Tensor loss(GPT2& model, const Batch& batch, double divisor) const override {
    // (B, T) inputs and targets: the mean over B*T, over the accumulation.
    return (chunked_ ? model->forward_loss(batch.x, batch.y) : next_token_loss(model->forward(batch.x), batch.y)) /
           divisor;
  }

 private:
  bool chunked_;
};

class Completion final : public Objective {
 public:
  explicit Completion(bool chunked) : chunked_(chunked) {}
  bool counts_targets() const override { return true; }
  double divisor(int64_t, int64_t world, int64_t targets) const override {
    return static_cast<double>(targets) / static_cast<double>(world);
  }
  torch::Tensor loss(GPT2& model, const Batch& batch, double divisor) const override {
    // Packed documents: positions restart per document; only the target rows reach the head.
    return chunked_ ? model->forward_loss(batch.x, batch.y, {batch.positions, batch.target_rows, divisor})
                    : next_token_loss(model->forward(batch.x, batch.positions), batch.y, divisor);
  }

 private:
  bool chunked_;
};

}  // namespace

std::unique_ptr<Objective> make_objective(bool document_shards, bool chunked) {
  if (document_shards) return std::make_unique<Completion>(chunked);
  return std::make_unique<LanguageModel>(chunked);
}

}  // namespace gpt2ft
