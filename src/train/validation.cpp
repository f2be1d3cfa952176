// Validation during training.
#include "gpt2ft/train/validation.h"

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/train/objective.h"

namespace gpt2ft {

Validation::Validation(const TrainConfig& config, int64_t micro_batch, c10::ScalarType amp, Communicator& comm,
                       c10::Device device, PreferenceReference* reference)
    : config_(config), reference_(reference), device_(device) {
  if (!config.data.val.empty()) shards_ = expand_glob(config.data.val, "data.val");
  options_.seq_len = config.data.seq_len;
  options_.packing = config.data.packing;
  options_.too_long = config.data.too_long;
  options_.what = "data.val";
  options_.batch_size = config.eval.batch_size > 0 ? config.eval.batch_size : micro_batch;
  options_.max_sequences = config.eval.max_sequences;
  options_.amp_dtype = amp;
  options_.comm = &comm;
}

std::optional<EvalResult> Validation::run(GPT2& model) {
  if (shards_.empty()) return std::nullopt;
  const EvalResult r = reference_ ? run_pairs(model) : evaluate(model, shards_, options_, device_);
  options_.max_forward_batch = r.forward_batch;  // what fitted, for the next evaluation
  if (!described_) {
    described_ = true;
    spdlog::info("validation set: {} sequences, {} target tokens ({}), the same for any micro batch, eval batch or "
                 "number of ranks", r.sequences, r.tokens,
                 options_.max_sequences > 0 ? "the first eval.max_sequences of data.val" : "all of data.val");
  }
  model->train();
  return r;
}

// The DPO loss and TRL's metrics over data.val's first eval.max_sequences pairs (all by
// default), rank r scoring pairs r, r+W, ... in passes that halve on out of memory.
EvalResult Validation::run_pairs(GPT2& model) {
  if (!pairs_) {  // preference shards: the trainer checked
    pairs_ = pair_samples(shards_, options_.seq_len, options_.too_long, model->config().vocab_size, "data.val");
  }
  const int64_t N = options_.max_sequences > 0 ? std::min(pairs_->size(), options_.max_sequences) : pairs_->size();
  std::vector<int64_t> mine;
  for (int64_t i = options_.comm->rank(); i < N; i += options_.comm->world_size()) mine.push_back(i);
  int64_t per_pass = options_.max_forward_batch > 0 ? std::min(options_.batch_size, options_.max_forward_batch)
                                                    : options_.batch_size;
  const PreferenceLossOptions loss_options{config_.dpo.loss, config_.dpo.beta, config_.dpo.label_smoothing};
  std::vector<torch::Tensor> sums(8, torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device_)));
  if (!mine.empty()) {
    const torch::Tensor s = preference_sums(model, *reference_, *pairs_, mine, per_pass, loss_options,
                                            config_.train.chunked_loss, options_.amp_dtype, device_, /*validation=*/true);
    for (size_t i = 0; i < sums.size(); ++i) sums[i] = s[static_cast<int64_t>(i)];
  }
  const std::vector<double> total = options_.comm->reduce_device_scalars(sums, HostReduce::sum, "validation");
  EvalResult r;
  r.loss = total[0] / static_cast<double>(N);
  r.sequences = N;
  r.tokens = static_cast<int64_t>(total[7]);
  r.forward_batch = per_pass;
  const std::vector<std::string> names = preference_metric_names();
  for (size_t i = 0; i + 1 < names.size(); ++i) r.metrics.emplace_back(names[i], total[i + 1] / static_cast<double>(N));
  return r;
}

void Validation::training_micro_batch_changed(int64_t micro_batch) {
  if (config_.eval.batch_size == 0) options_.batch_size = micro_batch;
}

}  // namespace gpt2ft
