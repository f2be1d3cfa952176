// The three preference references and the batches of pairs they score.
#include "gpt2ft/train/preference_reference.h"

#include <chrono>
#include <filesystem>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/fault_injection.h"
#include "gpt2ft/core/out_of_memory.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/model/lora.h"
#include "gpt2ft/train/run_fingerprint.h"

namespace gpt2ft {
namespace fs = std::filesystem;

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
  torch::Tensor out = model->forward_logprobs(batch.x, batch.y, {batch.positions, batch.target_rows}, chunked);
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

// "model": a frozen copy of the initial policy.
class CopyReference final : public PreferenceReference {
 public:
  CopyReference(GPT2& policy, c10::ScalarType amp, bool chunked) : copy_(policy->config()), chunked_(chunked) {
    torch::NoGradGuard no_grad;
    auto wanted = copy_->named_parameters();
    for (const auto& item : policy->named_parameters()) {
      if (is_lora_parameter(item.key())) continue;
      torch::Tensor* p = wanted.find(item.key());
      if (p == nullptr) throw Error("dpo.reference \"model\": the copy has no parameter " + item.key());
      p->set_data(item.value().detach().to(torch::kFloat).clone());
    }
    copy_->to(policy->transformer->wte->weight.device());
    fold_adapters(policy);
    for (auto& p : copy_->parameters()) {  // 16-bit under a 16-bit autocast (amp is kFloat without one)
      p.set_requires_grad(false);
      p.set_data(p.to(amp));
    }
    copy_->set_activation_checkpointing(0);
    copy_->eval();
  }
  torch::Tensor logps(GPT2&, const Batch& batch, bool) override {
    return reference_row_logprobs(copy_, batch, chunked_);
  }

 private:
  // A continued adapter is part of the initial policy: W += scaling * B A in the copy.
  void fold_adapters(GPT2& policy) {
    auto weights = copy_->named_parameters();
    for (const auto& [name, adapter] : lora_adapters(policy)) {
      torch::Tensor* w = weights.find(name + ".weight");
      if (w == nullptr) throw Error("dpo.reference \"model\": the copy has no projection " + name);
      w->add_(lora_product(*adapter), adapter->scaling);
    }
  }

  GPT2 copy_;
  bool chunked_;
};

// "precomputed": tables of the initial model's log-probs, by example.
class PrecomputedReference final : public PreferenceReference {
 public:
  PrecomputedReference(const TrainConfig& cfg, GPT2& policy, c10::ScalarType amp, Communicator& comm,
                       c10::Device device, int64_t per_pass)
      : path_(fs::path(cfg.output_dir) / "reference_logps.safetensors") {
    const fs::path& path = path_;
    nlohmann::json key = run_fingerprint(cfg);
    key["data.val"] = cfg.data.val.empty() ? "" : fs::absolute(cfg.data.val).lexically_normal().string();
    key["eval.max_sequences"] = std::to_string(cfg.eval.max_sequences);
    const std::string key_text = key.dump();
    const bool have = read(path, key_text, device);
    if (comm.agree_max({have ? 0 : 1}, "the precomputed reference")[0] == 0) {
      spdlog::info("DPO reference: the log-probs precomputed for this run in {} ({} training and {} validation "
                   "examples)", path.string(), train_.size(0), val_.defined() ? val_.size(0) : 0);
      return;
    }
    const auto started = std::chrono::steady_clock::now();
    train_ = score(cfg, cfg.data.train, "data.train", 0, per_pass, policy, amp, comm, device);
    if (!cfg.data.val.empty()) {
      val_ = score(cfg, cfg.data.val, "data.val", cfg.eval.max_sequences, per_pass, policy, amp, comm, device);
    }
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
  // The table of `path` when it was made for this run (`key`), else false.
  bool read(const fs::path& path, const std::string& key, c10::Device device) {
    if (!fs::exists(path)) return false;
    try {
      const SafetensorsReader reader(path);
      const auto it = reader.metadata().find("gpt2ft.reference_of");
      if (it == reader.metadata().end() || it->second != key) {
        spdlog::info("DPO reference: {} was made for another run or data; scoring again", path.string());
        return false;
      }
      train_ = reader.load("train", c10::kFloat).to(device);
      if (reader.contains("val")) val_ = reader.load("val", c10::kFloat).to(device);
      return true;
    } catch (const Error& e) {
      spdlog::warn("DPO reference: {} is unreadable ({}); scoring again", path.string(), e.what());
      return false;
    }
  }

  // (S, 2) log-prob sums of every example of `pattern`, rank r scoring examples r, r+W, ...
  static torch::Tensor score(const TrainConfig& cfg, const std::string& pattern, const std::string& what,
                             int64_t max_examples, int64_t per_pass, GPT2& policy, c10::ScalarType amp,
                             Communicator& comm, c10::Device device) {
    SampleOptions so;
    so.seq_len = cfg.data.seq_len;
    so.too_long = cfg.data.too_long;
    so.vocab_size = policy->config().vocab_size;
    so.what = what;
    const Samples samples(expand_glob(pattern, what), so);  // preference shards: the trainer checked
    const int64_t S = max_examples > 0 ? std::min(samples.size(), max_examples) : samples.size();
    std::vector<int64_t> mine;
    for (int64_t i = comm.rank(); i < S; i += comm.world_size()) mine.push_back(i);
    torch::Tensor table = torch::zeros({S, 2}, torch::TensorOptions().device(device));
    if (!mine.empty()) {
      AutocastGuard autocast(device.type(), amp);
      const torch::Tensor scores = score_in_passes(samples, mine, per_pass, device, [&](const Batch& b) {
        return reference_row_logprobs(policy, b, cfg.train.chunked_loss);
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

}  // namespace

std::unique_ptr<PreferenceReference> make_preference_reference(const TrainConfig& cfg, GPT2& policy,
                                                               c10::ScalarType amp, Communicator& comm,
                                                               c10::Device device, int64_t micro_batch) {
  if (cfg.dpo.reference == "base") return std::make_unique<BaseReference>(cfg.train.chunked_loss);
  if (cfg.dpo.reference == "model") return std::make_unique<CopyReference>(policy, amp, cfg.train.chunked_loss);
  return std::make_unique<PrecomputedReference>(cfg, policy, amp, comm, device,
                                                cfg.eval.batch_size > 0 ? cfg.eval.batch_size : micro_batch);
}

}  // namespace gpt2ft
