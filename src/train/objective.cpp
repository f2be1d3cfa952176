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
  ObjectiveLoss loss(GPT2& model, const Batch& batch, double divisor) const override {
    // (B, T) inputs and targets: the mean over B*T, over the accumulation.
    return {(chunked_ ? model->forward_loss(batch.x, batch.y) : next_token_loss(model->forward(batch.x), batch.y)) /
                divisor,
            {}};
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
  ObjectiveLoss loss(GPT2& model, const Batch& batch, double divisor) const override {
    // Packed documents: positions restart per document; only the target rows reach the head.
    const SequenceBounds bounds{batch.cu_seqlens, batch.max_len};
    return {chunked_ ? model->forward_loss(batch.x, batch.y, {batch.positions, batch.target_rows, divisor, bounds})
                     : next_token_loss(model->forward(batch.x, batch.positions, bounds), batch.y, divisor),
            {}};
  }

 private:
  bool chunked_;
};

class Preference final : public Objective {
 public:
  Preference(const PreferenceLossOptions& options, bool chunked, int64_t global_pairs, PreferenceReference& reference)
      : options_(options), chunked_(chunked), global_pairs_(global_pairs), reference_(reference) {}
  bool counts_targets() const override { return false; }
  double divisor(int64_t, int64_t world, int64_t) const override {
    return static_cast<double>(global_pairs_) / static_cast<double>(world);
  }
  ObjectiveLoss loss(GPT2& model, const Batch& batch, double divisor) const override {
    // (2B) rows: example i's chosen in row 2i, its rejected in 2i+1.
    const LossTargets which{batch.positions, batch.target_rows, 0, {batch.cu_seqlens, batch.max_len}};
    const torch::Tensor policy = model->forward_logprobs(batch.x, batch.y, which, chunked_);
    const torch::Tensor reference = reference_.logps(model, batch, /*validation=*/false);
    const torch::Tensor counts = options_.loss == "ipo" ? row_target_counts(batch) : torch::Tensor();  // (2B)
    const PreferenceLoss l = preference_loss_of_rows(policy, reference, counts, options_);
    const double pairs = static_cast<double>(batch.samples.size());
    const torch::Tensor metrics = torch::stack({l.chosen_reward, l.rejected_reward, l.accuracy, l.margin,
                                                l.chosen_logp, l.rejected_logp, torch::ones_like(l.margin)}) *
                                  pairs;  // (7) sums over the pairs
    return {l.loss * (pairs / divisor), metrics};
  }
  std::vector<std::string> metric_names() const override { return preference_metric_names(); }

 private:
  PreferenceLossOptions options_;
  bool chunked_;
  int64_t global_pairs_;
  PreferenceReference& reference_;
};

}  // namespace

std::vector<std::string> preference_metric_names() {
  return {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
          "logps/chosen",   "logps/rejected",   "pairs"};
}

torch::Tensor row_target_counts(const Batch& batch) {
  const int64_t rows = batch.x.size(0), T = batch.x.size(1);
  // Not bincount: on CUDA it reads the ids' min and max on the host, a sync every micro batch.
  const auto options = batch.target_rows.options().dtype(torch::kFloat);
  return torch::zeros({rows}, options)
      .index_add_(0, batch.target_rows.div(T, "floor"), torch::ones({batch.target_rows.size(0)}, options));  // (2B)
}

PreferenceLoss preference_loss_of_rows(const torch::Tensor& policy, const torch::Tensor& reference,
                                       const torch::Tensor& counts, const PreferenceLossOptions& options) {
  torch::Tensor p = policy, r = reference.to(policy.dtype());  // (2B)
  if (options.loss == "ipo") {  // each row's mean over its targets (never 0: a side always keeps one)
    p = p / counts;
    r = r / counts;
  }
  const torch::Tensor pv = p.view({-1, 2}), rv = r.view({-1, 2});  // (B, 2) chosen | rejected
  return preference_loss(pv.select(1, 0), pv.select(1, 1), rv.select(1, 0), rv.select(1, 1), options);
}

std::unique_ptr<Objective> make_preference_objective(const PreferenceLossOptions& options, bool chunked,
                                                     int64_t global_pairs, PreferenceReference& reference) {
  return std::make_unique<Preference>(options, chunked, global_pairs, reference);
}

std::unique_ptr<Objective> make_objective(bool document_shards, bool chunked) {
  if (document_shards) return std::make_unique<Completion>(chunked);
  return std::make_unique<LanguageModel>(chunked);
}

}  // namespace gpt2ft
