// The three preference references and the batches of pairs they score.
#include "gpt2ft/train/preference_reference.h"

#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/fault_injection.h"
#include "gpt2ft/core/out_of_memory.h"
#include "gpt2ft/core/strings.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/model/lora.h"
#include "gpt2ft/train/objective.h"
#include "gpt2ft/train/run_fingerprint.h"
#include "gpt2ft/train/stop_signals.h"

namespace gpt2ft {
namespace fs = std::filesystem;

std::unique_ptr<Samples> pair_samples(const std::vector<fs::path>& shards, int64_t seq_len, const std::string& too_long,
                                      int64_t vocab_size, const std::string& what) {
  SampleOptions so;
  so.seq_len = seq_len;
  so.too_long = too_long;
  so.vocab_size = vocab_size;
  so.what = what;
  return std::make_unique<Samples>(shards, so);
}

Batch pair_batch(const Samples& samples, const std::vector<int64_t>& ids, c10::Device device) {
  const int64_t n = static_cast<int64_t>(ids.size()), T = samples.seq_len();
  torch::Tensor host = torch::empty({2 * n, 2, T}, torch::kLong);  // (2n, x|y, T)
  int64_t* data = host.data_ptr<int64_t>();
  for (int64_t i = 0; i < 2 * n; ++i) {
    int64_t* row = data + i * 2 * T;
    samples.read_pair(ids[static_cast<size_t>(i / 2)], static_cast<int>(i % 2), row, row + T);
  }
  const torch::Tensor rows = host.select(1, 1).reshape({-1}).ne(kIgnoreTarget).nonzero().squeeze(1);  // (K)
  Batch b;
  const torch::Tensor on_device = host.to(device);
  b.x = on_device.select(1, 0);
  b.y = on_device.select(1, 1);
  b.target_rows = rows.to(device);
  b.num_targets = rows.size(0);
  b.samples = ids;
  b.sample_ids = torch::tensor(ids, torch::kLong).to(device);
  return b;
}

torch::Tensor score_in_passes(const Samples& samples, const std::vector<int64_t>& ids, int64_t& per_pass,
                              c10::Device device, const std::function<torch::Tensor(const Batch&)>& score) {
  std::vector<torch::Tensor> parts;
  for (size_t at = 0; at < ids.size();) {
    const size_t n = std::min(static_cast<size_t>(per_pass), ids.size() - at);
    try {
      maybe_inject_oom(static_cast<int64_t>(n));
      parts.push_back(score(pair_batch(samples, {ids.begin() + at, ids.begin() + at + n}, device)));
      at += n;
    } catch (const std::exception& e) {
      if (!is_out_of_memory(e) || per_pass == 1) throw;
      release_cached_memory(device);
      per_pass = std::max<int64_t>(1, per_pass / 2);
      spdlog::warn("OUT OF MEMORY scoring preference pairs {} at a time ({}): continuing with {}", n,
                   describe_exception(e), per_pass);
    }
  }
  return torch::cat(parts);
}

torch::Tensor reference_row_logprobs(GPT2& model, const Batch& batch, bool chunked) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const LossTargets which{batch.positions, batch.target_rows, 0, {batch.cu_seqlens, batch.max_len}};
  torch::Tensor out = model->forward_logprobs(batch.x, batch.y, which, chunked);
  if (was_training) model->train();
  return out;
}

namespace {

// "base": the policy with its adapters off.
class BaseReference final : public PreferenceReference {
 public:
  explicit BaseReference(bool chunked) : chunked_(chunked) {}
  torch::Tensor logps(GPT2& policy, const Batch& batch, bool) override {
    AdaptersOff off(policy);
    return reference_row_logprobs(policy, batch, chunked_);
  }

 private:
  bool chunked_;
};

// Whether a parameter is a matmul weight that autocast casts at every use: the blocks'
// projections and an untied lm_head.
bool is_matmul_weight(const std::string& name) {
  return name == "lm_head.weight" || ends_with(name, "attn.c_attn.weight") || ends_with(name, "attn.c_proj.weight") ||
         ends_with(name, "mlp.c_fc.weight") || ends_with(name, "mlp.c_proj.weight");
}

// "model": a frozen copy of the initial policy (a continued adapter folded in) that computes as
// the policy does: its matmul weights, which autocast casts at every use anyway, are held in
// the autocast dtype; the embeddings, biases and LayerNorms in the policy's own dtype, so the
// residual stream is the policy's. Made tensor by tensor on the policy's device: no float32
// copy of the model, and no model initialised only to be overwritten.
class CopyReference final : public PreferenceReference {
 public:
  CopyReference(GPT2& policy, c10::ScalarType amp, bool chunked)
      : copy_(policy->config(), Weights::kPlaceholders), chunked_(chunked) {
    torch::NoGradGuard no_grad;
    std::map<std::string, const LoraAdapter*> adapters;  // by the adapted weight's name
    for (const auto& [name, adapter] : lora_adapters(policy)) adapters[name + ".weight"] = adapter;
    auto wanted = copy_->named_parameters();
    size_t filled = 0;
    for (const auto& item : policy->named_parameters()) {
      if (is_lora_parameter(item.key())) continue;
      torch::Tensor* p = wanted.find(item.key());
      if (p == nullptr) throw Error("dpo.reference \"model\": the copy has no parameter " + item.key());
      const torch::Tensor& w = item.value();
      const c10::ScalarType dtype = is_matmul_weight(item.key()) ? amp : w.scalar_type();
      const auto adapter = adapters.find(item.key());
      p->set_data(adapter == adapters.end()
                      ? w.detach().to(dtype, /*non_blocking=*/false, /*copy=*/true)
                      : (w.to(torch::kFloat) + lora_product(*adapter->second) * adapter->second->scaling).to(dtype));
      p->set_requires_grad(false);
      ++filled;
    }
    if (filled != wanted.size()) {
      throw Error("dpo.reference \"model\": the policy gave " + std::to_string(filled) + " of the copy's " +
                  std::to_string(wanted.size()) + " parameters");
    }
    copy_->set_activation_checkpointing(0);
    copy_->set_packed_attention(policy->packed_attention());
    copy_->eval();
  }
  torch::Tensor logps(GPT2&, const Batch& batch, bool) override {
    return reference_row_logprobs(copy_, batch, chunked_);
  }

 private:
  GPT2 copy_;
  bool chunked_;
};

// The pair samples of a preference glob (the trainer checked their kind at its start).
std::unique_ptr<Samples> open_pairs(const TrainConfig& cfg, const std::string& pattern, const std::string& what,
                                    int64_t vocab_size) {
  return pair_samples(expand_glob(pattern, what), cfg.data.seq_len, cfg.data.too_long, vocab_size, what);
}

// "precomputed": tables of the initial model's log-probs, by example. A table is reused only
// when its key (the run's fingerprint, and both data sets' shard identities) and its row
// counts are this run's: a replaced data.val is scored again, never indexed out of bounds.
class PrecomputedReference final : public PreferenceReference {
 public:
  PrecomputedReference(const TrainConfig& cfg, GPT2& policy, c10::ScalarType amp, Communicator& comm,
                       c10::Device device, int64_t per_pass)
      : path_(fs::path(cfg.output_dir) / "reference_logps.safetensors") {
    const fs::path& path = path_;
    nlohmann::json key = run_fingerprint(cfg);  // holds data.train's shard identity
    key["data.val"] = cfg.data.val.empty() ? "" : fs::absolute(cfg.data.val).lexically_normal().string();
    key["data.val shards"] = cfg.data.val.empty() ? "" : shards_identity(cfg.data.val, "data.val");
    key["eval.max_sequences"] = std::to_string(cfg.eval.max_sequences);
    const std::string key_text = key.dump();
    const int64_t vocab = policy->config().vocab_size;
    const auto train = open_pairs(cfg, cfg.data.train, "data.train", vocab);
    const auto val = cfg.data.val.empty() ? nullptr : open_pairs(cfg, cfg.data.val, "data.val", vocab);
    const int64_t val_rows = val ? (cfg.eval.max_sequences > 0 ? std::min(val->size(), cfg.eval.max_sequences)
                                                               : val->size())
                                 : 0;
    const bool have = read(path, key_text, train->size(), val_rows, device);
    if (comm.agree_max({have ? 0 : 1}, "the precomputed reference")[0] == 0) {
      spdlog::info("DPO reference: the log-probs precomputed for this run in {} ({} training and {} validation "
                   "examples)", path.string(), train_.size(0), val_.defined() ? val_.size(0) : 0);
      return;
    }
    const auto started = std::chrono::steady_clock::now();
    train_ = score(cfg, *train, "training", train->size(), per_pass, policy, amp, comm, device);
    if (val) val_ = score(cfg, *val, "validation", val_rows, per_pass, policy, amp, comm, device);
    unsaved_key_ = key_text;
    spdlog::info("DPO reference: the initial model scored {} training and {} validation examples in {:.1f} s "
                 "(eval mode, under the run's autocast); kept in {} for resumes",
                 train_.size(0), val_.defined() ? val_.size(0) : 0,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count(), path_.string());
  }

  void save(Communicator& comm) override {
    if (unsaved_key_.empty() || !comm.is_main()) return;
    NamedTensors tensors = {{"train", train_}};
    if (val_.defined()) tensors.emplace_back("val", val_);
    save_safetensors(path_, tensors, {{"format", "pt"}, {"gpt2ft.reference_of", unsaved_key_}});
    unsaved_key_.clear();
  }

  torch::Tensor logps(GPT2&, const Batch& batch, bool validation) override {
    const torch::Tensor& table = validation ? val_ : train_;  // (S, 2)
    // The ids came to the device with the batch (no blocking copy inside the step).
    return table.index_select(0, batch.sample_ids).reshape({-1});  // (2B) chosen, rejected, ...
  }

 private:
  // The tables of `path` when they were made for this run (`key`) with these row counts
  // (val_rows 0: no data.val), else false (and nothing kept).
  bool read(const fs::path& path, const std::string& key, int64_t train_rows, int64_t val_rows, c10::Device device) {
    if (!fs::exists(path)) return false;
    try {
      const SafetensorsReader reader(path);
      const auto it = reader.metadata().find("gpt2ft.reference_of");
      if (it == reader.metadata().end() || it->second != key) {
        spdlog::info("DPO reference: {} was made for another run or data; scoring again", path.string());
        return false;
      }
      const torch::Tensor train = reader.load("train", c10::kFloat);
      const torch::Tensor val = reader.contains("val") ? reader.load("val", c10::kFloat) : torch::Tensor();
      const auto rows = [](const torch::Tensor& t) { return t.defined() && t.dim() == 2 && t.size(1) == 2 ? t.size(0) : -1; };
      const int64_t found_val = val.defined() ? rows(val) : 0;
      if (rows(train) != train_rows || found_val != val_rows) {
        spdlog::info("DPO reference: {} holds {} training and {} validation examples, the data {} and {}; scoring "
                     "again", path.string(), rows(train), found_val, train_rows, val_rows);
        return false;
      }
      train_ = train.to(device);
      if (val.defined()) val_ = val.to(device);
      return true;
    } catch (const Error& e) {
      spdlog::warn("DPO reference: {} is unreadable ({}); scoring again", path.string(), e.what());
      return false;
    }
  }

  // (S, 2) log-prob sums of the first S examples of `samples`, rank r scoring examples r, r+W, ...
  // `label`: "training" or "validation", for the progress lines.
  static torch::Tensor score(const TrainConfig& cfg, const Samples& samples, const char* label, int64_t S,
                             int64_t per_pass, GPT2& policy, c10::ScalarType amp, Communicator& comm,
                             c10::Device device) {
    std::vector<int64_t> mine;
    for (int64_t i = comm.rank(); i < S; i += comm.world_size()) mine.push_back(i);
    torch::Tensor table = torch::zeros({S, 2}, torch::TensorOptions().device(device));
    if (!mine.empty()) {
      AutocastGuard autocast(device.type(), amp);
      // Progress every 10 s, and a stop signal honoured between passes (nothing is trained yet:
      // nothing to save; the next start scores again).
      const auto started = std::chrono::steady_clock::now();
      auto last_report = started;
      int64_t done = 0;
      const torch::Tensor scores = score_in_passes(samples, mine, per_pass, device, [&](const Batch& b) {
        if (const int signum = StopSignals::requested()) {
          throw ExitRequest(kExitStopped, std::string("stopped by signal ") + strsignal(signum) + " while scoring the "
                                              "DPO reference (dpo.reference \"precomputed\"), before any step: nothing "
                                              "to save. Run again to start over");
        }
        torch::Tensor out = reference_row_logprobs(policy, b, cfg.train.chunked_loss);
        done += static_cast<int64_t>(b.samples.size());
        const auto now = std::chrono::steady_clock::now();
        if (now - last_report > std::chrono::seconds(10)) {
          const double s = std::chrono::duration<double>(now - started).count();
          spdlog::info("DPO reference: scored {} of {} {} examples ({:.0f} a second, about {:.0f} s left)", done,
                       mine.size(), label, done / s,
                       static_cast<double>(static_cast<int64_t>(mine.size()) - done) / std::max(done / s, 1e-9));
          last_report = now;
        }
        return out;
      });  // (2n)
      table.index_copy_(0, torch::tensor(mine, torch::kLong).to(device), scores.view({-1, 2}));
    }
    if (comm.active()) comm.all_reduce_sum_(table, "the precomputed reference");
    return table;
  }

  fs::path path_;
  std::string unsaved_key_;    // scored here, not yet saved: the key to save the tables under
  torch::Tensor train_, val_;  // (S, 2) on the device
};

// Another model, frozen: its log-probs in eval mode.
class ModelReference final : public PreferenceReference {
 public:
  ModelReference(GPT2 model, bool chunked) : model_(std::move(model)), chunked_(chunked) {
    for (auto& p : model_->parameters()) p.set_requires_grad(false);
    model_->eval();
  }
  torch::Tensor logps(GPT2&, const Batch& batch, bool) override { return reference_row_logprobs(model_, batch, chunked_); }

 private:
  GPT2 model_;
  bool chunked_;
};

}  // namespace

std::unique_ptr<PreferenceReference> base_reference(bool chunked) { return std::make_unique<BaseReference>(chunked); }

std::unique_ptr<PreferenceReference> model_reference(GPT2 model, bool chunked) {
  return std::make_unique<ModelReference>(std::move(model), chunked);
}

torch::Tensor preference_sums(GPT2& policy, PreferenceReference& reference, const Samples& samples,
                              const std::vector<int64_t>& ids, int64_t& per_pass, const PreferenceLossOptions& options,
                              bool chunked, c10::ScalarType amp, c10::Device device, bool validation) {
  torch::NoGradGuard no_grad;
  AutocastGuard autocast(device.type(), amp);
  const torch::Tensor scored = score_in_passes(samples, ids, per_pass, device, [&](const Batch& b) {
    return torch::stack({reference_row_logprobs(policy, b, chunked), reference.logps(policy, b, validation).to(torch::kFloat),
                         row_target_counts(b)},
                        1);  // (2n, 3) policy, reference, targets
  });
  const PreferenceLoss l = preference_loss_of_rows(scored.select(1, 0), scored.select(1, 1), scored.select(1, 2), options);
  const double n = static_cast<double>(ids.size());
  return torch::stack({l.loss.to(torch::kDouble) * n, l.chosen_reward.to(torch::kDouble) * n,
                       l.rejected_reward.to(torch::kDouble) * n, l.accuracy.to(torch::kDouble) * n,
                       l.margin.to(torch::kDouble) * n, l.chosen_logp.to(torch::kDouble) * n,
                       l.rejected_logp.to(torch::kDouble) * n, scored.select(1, 2).sum().to(torch::kDouble)});  // (8)
}

std::unique_ptr<PreferenceReference> make_preference_reference(const TrainConfig& cfg, GPT2& policy,
                                                               c10::ScalarType amp, Communicator& comm,
                                                               c10::Device device, int64_t micro_batch) {
  if (cfg.dpo.reference == "base") return std::make_unique<BaseReference>(cfg.train.chunked_loss);
  if (cfg.dpo.reference == "model") return std::make_unique<CopyReference>(policy, amp, cfg.train.chunked_loss);
  return std::make_unique<PrecomputedReference>(cfg, policy, amp, comm, device,
                                                cfg.eval.batch_size > 0 ? cfg.eval.batch_size : micro_batch);
}

}  // namespace gpt2ft
