// Validation during training.
#include "gpt2ft/train/validation.h"

#include <spdlog/spdlog.h>

#include "gpt2ft/data/shard.h"

namespace gpt2ft {

Validation::Validation(const TrainConfig& config, int64_t micro_batch, c10::ScalarType amp, Communicator& comm,
                       c10::Device device)
    : config_(config), device_(device) {
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
  const EvalResult r = evaluate(model, shards_, options_, device_);
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

void Validation::training_micro_batch_changed(int64_t micro_batch) {
  if (config_.eval.batch_size == 0) options_.batch_size = micro_batch;
}

}  // namespace gpt2ft
