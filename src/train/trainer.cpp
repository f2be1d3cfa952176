// The training loop. Trainer::train_step reads like the algorithm; setting up a run, the
// out-of-memory back-off, metrics, validation and checkpoints are the members around it.
#include "gpt2ft/train/trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/autocast.h"
#include "gpt2ft/core/cuda_info.h"
#include "gpt2ft/core/device.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/fault_injection.h"
#include "gpt2ft/core/folder_lock.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/core/out_of_memory.h"
#include "gpt2ft/core/reproducible_math.h"
#include "gpt2ft/core/rng_state.h"
#include "gpt2ft/data/loader.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/data/samples.h"
#include "gpt2ft/data/shard_manifest.h"
#include "gpt2ft/distributed/communicator.h"
#include "gpt2ft/distributed/grad_reducer.h"
#include "gpt2ft/distributed/launch_env.h"
#include "gpt2ft/distributed/optimizer_shards.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/memory/counting_allocator.h"
#include "gpt2ft/memory/levers.h"
#include "gpt2ft/memory/run_memory.h"
#include "gpt2ft/model/finetune.h"
#include "gpt2ft/model/init.h"
#include "gpt2ft/model/lora.h"
#include "gpt2ft/model/packed_attention.h"
#include "gpt2ft/optim/adamw.h"
#include "gpt2ft/optim/adamw_8bit.h"
#include "gpt2ft/optim/grad_clip.h"
#include "gpt2ft/optim/grad_scaler.h"
#include "gpt2ft/optim/lr_schedule.h"
#include "gpt2ft/optim/offloaded_adamw.h"
#include "gpt2ft/train/batch_split.h"
#include "gpt2ft/train/objective.h"
#include "gpt2ft/train/oom_backoff.h"
#include "gpt2ft/train/run_checkpoints.h"
#include "gpt2ft/train/run_fingerprint.h"
#include "gpt2ft/train/step_outcome.h"
#include "gpt2ft/train/stop_signals.h"
#include "gpt2ft/train/validation.h"

namespace gpt2ft {
namespace fs = std::filesystem;
namespace {

using Clock = std::chrono::steady_clock;

// LoRA (model.lora.*): adapters on the targeted projections of a frozen base, fresh or
// continued from a PEFT adapter folder whose r, alpha and targets are then used.
// save_embeddings: the vocabulary grew for a chat template's tokens, whose rows LoRA alone
// would leave untrained: the embedding is trained in full and saved with the adapter.
void attach_lora(GPT2& model, const TrainConfig& cfg, bool save_embeddings) {
  const auto& o = cfg.model.lora;
  LoraConfig lora = cfg.lora_config();
  lora.save_embeddings = lora.save_embeddings || save_embeddings;
  add_lora(model, lora);
  if (!o.init_from.empty()) load_adapter_weights(model, o.init_from);
  if (o.base_dtype != "float32") cast_frozen_base(model, o.base_dtype == "bfloat16" ? c10::kBFloat16 : c10::kHalf);
  int64_t adapters = 0;
  for (const auto& p : model->parameters()) adapters += p.requires_grad() ? p.numel() : 0;
  const int64_t embedding = lora.save_embeddings ? model->transformer->wte->weight.numel() : 0;
  spdlog::info("LoRA: rank {}, alpha {:g} (scaling {:g}), dropout {:g}, targets {}: {} adapters, {} parameters; base "
               "frozen in {}{}",
               lora.rank, lora.alpha, lora.scaling(), lora.dropout, nlohmann::json(lora.targets).dump(),
               lora_adapters(model).size(), adapters - embedding, o.base_dtype,
               embedding ? fmt::format("; the token embedding ({} parameters) trains in full for the chat template's "
                                       "new tokens and is saved with the adapter (modules_to_save)", embedding)
                         : std::string());
}

// chat: what data.train's manifest says of its chat template's tokens (shard_chat).
GPT2 build_model(const TrainConfig& cfg, c10::Device device, const std::optional<ShardChat>& chat) {
  const double dropout = cfg.model_dropout();
  auto set_dropout = [&](GPT2Config& c) {
    if (dropout >= 0) c.resid_pdrop = c.embd_pdrop = c.attn_pdrop = dropout;
  };
  GPT2 model{nullptr};
  if (!cfg.model.init_from.empty()) {
    model = load_model_folder(cfg.model.init_from, c10::kCPU, set_dropout);
  } else {
    GPT2Config c = GPT2Config::preset(cfg.model.preset);
    set_dropout(c);
    model = GPT2(c);
    init_gpt2_weights(model, static_cast<uint64_t>(cfg.train.seed));
  }
  const int64_t vocab = vocab_for_data(chat, model->config().vocab_size, cfg.model.resize_vocab);
  // Rows for the chat template's tokens that the model does not have: they must train.
  const bool grown_for_chat = chat && chat->vocab_size() > model->config().vocab_size;
  if (grown_for_chat && cfg.model.freeze_embeddings) {
    throw Error("model.freeze_embeddings: the shards of data.train use the chat template's tokens " +
                nlohmann::json(chat->added_tokens).dump() + ", which " + (cfg.model.init_from.empty() ? std::string("the model") : cfg.model.init_from) +
                " does not have; frozen, their new rows would never learn. Unfreeze the embeddings, or tokenize with "
                "--chat-template plain (no new tokens)");
  }
  if (vocab != model->config().vocab_size) {
    spdlog::info("resizing the vocabulary from {} to {}{}", model->config().vocab_size, vocab,
                 grown_for_chat ? " (the chat template's tokens, rounded up to a multiple of 64)" : "");
    model = resize_vocab(model, vocab);
  }
  model->set_activation_checkpointing(cfg.checkpoint_every_n_blocks());
  model->set_packed_attention(cfg.attention.packed == "varlen" ? PackedAttention::kVarlen : PackedAttention::kMask);
  freeze(model, cfg.model.freeze_embeddings, cfg.model.freeze_blocks);
  if (cfg.lora()) attach_lora(model, cfg, grown_for_chat);
  model->to(device);
  model->train();
  if (cfg.data.seq_len > model->config().n_positions) {
    throw Error("data.seq_len (" + std::to_string(cfg.data.seq_len) + ") exceeds the model's n_positions (" +
                std::to_string(model->config().n_positions) + ")");
  }
  return model;
}

// Out of memory where a smaller micro batch would not help (the optimizer step, validation at
// one window per forward pass, saving) ends the run: an Error with the allocator's message.
template <class F>
auto fatal_if_out_of_memory(const std::string& where, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const ExitRequest&) {
    throw;
  } catch (const std::exception& e) {
    if (!is_out_of_memory(e)) throw;
    throw Error("ran out of memory " + where + " (" + describe_exception(e) +
                "); a smaller micro batch would not shrink this. The run stops here without saving, and the last "
                "checkpoint is intact: resume with more memory, or with a lever `gpt2-finetune plan` lists "
                "(train.optimizer \"adamw_8bit\", train.optimizer_offload \"cpu\")");
  }
}

// The device of this process: one GPU per rank (its local rank's) when distributed, with the
// run's CUDA settings applied before anything is allocated on it.
c10::Device training_device(const TrainConfig& cfg, const LaunchEnv& env) {
  const c10::Device device = rank_device(parse_device(cfg.device, "device"), env);
  if (cfg.train.deterministic) request_deterministic_math(device.type());  // before anything computes
  if (device.is_cuda()) {  // made current here, for one process on cuda:N as for a rank
    configure_cuda(device, {cfg.cuda.tf32, cfg.cuda.expandable_segments,
                            cfg.cuda.memory_limit.empty() ? 0 : parse_memory_size(cfg.cuda.memory_limit, "cuda.memory_limit")});
    if (!cfg.cpu.memory_limit.empty()) {
      spdlog::warn("cpu.memory_limit is ignored: it limits tensor memory when training on the CPU (device \"cpu\")");
    }
  } else if (std::getenv("GPT2FT_BENCH_UNCOUNTED") == nullptr || !cfg.cpu.memory_limit.empty()) {
    // The CPU rehearsal: tensor memory counted, and refused past cpu.memory_limit as CUDA would
    // (GPT2FT_BENCH_UNCOUNTED: a benchmark's baseline without the counting).
    install_counting_cpu_allocator();
    set_cpu_memory_limit(cfg.cpu.memory_limit.empty() ? 0 : parse_memory_size(cfg.cpu.memory_limit, "cpu.memory_limit"));
    reset_cpu_memory_peaks();
  }
  return device;
}

// Logs of a multi-rank run carry the rank; only rank 0 logs below warnings.
LaunchEnv launch_env_with_logging() {
  const LaunchEnv env = read_launch_env();
  if (env.distributed()) {
    spdlog::set_pattern("[%H:%M:%S] [rank " + std::to_string(env.rank) + "] %^%l%$ %v");
    if (env.rank != 0) spdlog::set_level(spdlog::level::warn);
  }
  return env;
}

// The trained parameters, named, in the model's order (the same on every rank).
std::vector<std::pair<std::string, torch::Tensor>> trained_parameters(GPT2& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : model->named_parameters()) {
    if (item.value().requires_grad()) out.emplace_back(item.key(), item.value());
  }
  return out;
}

bool fused_adamw(const TrainConfig& cfg, c10::Device device) {
  return cfg.train.fused_adamw == "on" || (cfg.train.fused_adamw == "auto" && device.is_cuda());
}

std::unique_ptr<Optimizer> make_optimizer(const TrainConfig& cfg, Communicator& comm, c10::Device device,
                                          const std::vector<std::pair<std::string, torch::Tensor>>& trained) {
  AdamWOptions options;
  options.weight_decay = cfg.train.weight_decay;
  options.betas = cfg.train.betas;
  options.eps = cfg.train.eps;
  options.fused = fused_adamw(cfg, device);
  options.quantize_embeddings = cfg.train.adamw_8bit_embeddings == "8bit";
  const bool eight_bit = cfg.train.optimizer == "adamw_8bit";
  if (eight_bit && cfg.train.fused_adamw == "on") {
    throw Error("train.fused_adamw \"on\" is AdamW's fused kernel; train.optimizer \"adamw_8bit\" has its own "
                "step: set train.fused_adamw \"auto\"");
  }
  const auto make = [&](const std::vector<std::pair<std::string, torch::Tensor>>& params) -> std::unique_ptr<Optimizer> {
    if (cfg.train.optimizer_offload == "cpu") {
      // Gradients averaged over ranks are final only after backward: those go at step().
      return std::make_unique<OffloadedAdamW>(params, options, device,
                                              static_cast<int64_t>(cfg.distributed.bucket_mb * (1 << 20)),
                                              /*take_in_backward=*/!comm.active(), eight_bit);
    }
    if (eight_bit) return std::make_unique<AdamW8bit>(params, options);
    return std::make_unique<AdamW>(params, options);
  };
  // ZeRO-1: each rank's optimizer (offloaded or not) holds only its share.
  if (cfg.distributed.shard_optimizer && comm.distributed()) return std::make_unique<OptimizerShards>(comm, trained, make);
  return make(trained);
}

std::optional<GradScaler> make_scaler(const TrainConfig& cfg, c10::ScalarType amp, c10::Device device) {
  if (amp != c10::kHalf) return std::nullopt;
  return GradScaler(device, {cfg.amp.init_scale, cfg.amp.growth_factor, cfg.amp.backoff_factor,
                             cfg.amp.growth_interval});
}

const char* amp_name(c10::ScalarType amp) {
  return amp == c10::kBFloat16 ? "bfloat16" : amp == c10::kHalf ? "float16" : "none";
}

// What one optimizer step produced, still on the device.
struct StepResult {
  torch::Tensor loss;       // () this rank's mean loss over its share of the global batch
  torch::Tensor metrics;    // (M) the objective's metric sums over this rank's examples, or undefined
  torch::Tensor grad_norm;  // () before clipping
  double lr = 0;
  StepOutcome outcome;
};

// Where a step starts, to redo it from its first sample.
struct StepStart {
  LoaderState loader;
  RngStates rng;
};

class Trainer {
 public:
  Trainer(const TrainConfig& cfg, const RunEnd& end);
  TrainSummary run();

 private:
  StepResult train_step(int64_t step);
  torch::Tensor forward_backward(std::string& oom_message, bool& interrupted, torch::Tensor& metrics);
  ObjectiveLoss micro_batch_loss(const Batch& batch, double divisor);
  void back_off(int64_t step, std::string why, const StepStart& start);
  std::string fit_advice(const fs::path& saved, int64_t step) const;
  void stop_if_not_finite(int64_t step);
  void after_step(int64_t step, const StepResult& result);
  void log_step(int64_t step, const StepResult& result);
  std::optional<double> validate(int64_t step);
  void track_best(int64_t step, double loss);
  bool evaluation_due(int64_t done) const;
  fs::path save_checkpoint();
  [[noreturn]] void stop(int64_t step, const StepOutcome& outcome);
  void stop_if_requested(const char* during) const;
  [[noreturn]] void interrupt(int64_t step, const StepStart& start);
  TrainSummary finish();
  void save_final_model();
  void apply_step(StepResult& r);
  void write_model(const fs::path& dir);
  void save_model(const fs::path& dir);
  void check_best_folder();
  std::string last_checkpoint_words() const;
  void save_best(int64_t step, double loss);

  void check_data_fits_objective() const;
  void start_every_rank_alike();
  std::unique_ptr<DataLoader> make_loader() const;
  int64_t steps_to_run() const;
  void warn_if_the_schedule_moved() const;
  int64_t rows_per_sample() const { return loader_->holds_pairs() ? 2 : 1; }
  void log_run();

  TrainConfig cfg_;  // as given, with "auto" settings resolved once known
  RunEnd end_;
  const Clock::time_point start_ = Clock::now();
  const LaunchEnv env_;
  const c10::Device device_;
  Communicator comm_;
  StopSignals stop_signals_;
  GPT2 model_{nullptr};
  BatchSplit split_;
  c10::ScalarType amp_;
  std::vector<torch::Tensor> params_;  // trained
  std::unique_ptr<Optimizer> optimizer_;
  std::optional<GradScaler> scaler_;
  RunCheckpoints checkpoints_;
  std::optional<FolderLock> lock_;  // output_dir, held by rank 0 for the whole run
  torch::Tensor nonfinite_steps_;   // () float, on the device: steps skipped for non-finite gradients
  bool poison_loss_ = false;        // GPT2FT_FAULT_NAN_AT_STEP
  TrainingState state_;
  std::unique_ptr<DataLoader> loader_;
  std::unique_ptr<PreferenceReference> reference_;  // train.objective "dpo": the reference's log-probs
  std::unique_ptr<Objective> objective_;  // what the step minimises, for the loader's kind of data
  std::optional<ShardChat> chat_;         // data.train's chat template and its added tokens, if any
  int64_t max_steps_ = 0;
  LrSchedule schedule_;
  std::unique_ptr<GradReducer> reducer_;
  std::unique_ptr<Validation> validation_;
  std::unique_ptr<MetricsLog> metrics_;
  OomBackoff backoff_;
  TrainSummary summary_;
  int64_t first_step_ = 0;  // of this invocation (after a resume, the checkpoint's step)
  bool logged_first_ = false;
  torch::Tensor interval_loss_;  // () on the device: the summed losses of the steps since the last log row
  torch::Tensor interval_metrics_;  // (M) on the device: the objective's metric sums since the last log row
  int64_t interval_steps_ = 0;
  int64_t last_val_step_ = -1;   // the step of the last validation (finish() does not repeat it)
  std::optional<double> last_val_loss_;
  bool early_stopped_ = false;
};

Trainer::Trainer(const TrainConfig& cfg, const RunEnd& end)
    : cfg_(cfg),
      end_(end),
      env_(launch_env_with_logging()),
      device_(training_device(cfg, env_)),
      comm_(env_, device_, cfg.distributed.backend, cfg.distributed.timeout_s),
      checkpoints_(cfg_, comm_, device_),
      backoff_(cfg.oom) {
  chat_ = shard_chat(expand_glob(cfg_.data.train, "data.train"));
  check_data_fits_objective();
  if (!cfg_.model.init_from.empty()) {  // shards of another tokenizer would train without a word
    const fs::path tokenizer_dir = model_tokenizer_folder(cfg_.model.init_from);  // a checkpoint: its run's model
    const auto model_tokenizer = model_tokenizer_identity(tokenizer_dir);
    check_shards_match_model(expand_glob(cfg_.data.train, "data.train"), tokenizer_dir, model_tokenizer, "data.train");
    if (!cfg_.data.val.empty()) {
      check_shards_match_model(expand_glob(cfg_.data.val, "data.val"), tokenizer_dir, model_tokenizer, "data.val");
    }
    if (chat_) check_added_tokens_match(*chat_, tokenizer_dir, "data.train");
  }
  if (comm_.is_main()) lock_.emplace(cfg_.output_dir, "output_dir");  // one run per folder
  fs::create_directories(cfg_.output_dir);
  // The whole resolved config goes to train_config.json (and --print-config prints it): the log
  // names what matters and where the rest is.
  spdlog::info("config: output_dir {}; the resolved options (defaults and --set applied) go to train_config.json",
               cfg_.output_dir);

  // Every rank builds the same model from the same seed; rank 0's copy is broadcast anyway.
  torch::manual_seed(static_cast<uint64_t>(cfg_.train.seed));
  model_ = build_model(cfg_, device_, chat_);
  stop_if_requested("building the model");
  split_ = batch_split_of(cfg_, comm_.world_size());
  if (cfg_.checkpointing_auto()) {
    const int64_t every = auto_checkpointing(cfg_, device_, split_);
    cfg_.model.activation_checkpointing = every == 0 ? "none" : every == 1 ? "all" : std::to_string(every);
    model_->set_activation_checkpointing(every);
  }
  if (cfg_.micro_batch_auto()) split_.micro = auto_micro_batch(cfg_, device_, split_);
  if (split_.auto_accumulation > 0) split_.global = split_.micro * split_.auto_accumulation * split_.world;
  amp_ = resolve_amp_dtype(cfg_.amp.dtype, device_);
  if (amp_ == c10::kHalf && !device_.is_cuda()) {
    spdlog::warn("amp.dtype \"float16\" on the CPU: it runs, with a loss scale, but slower than float32 (few CPUs "
                 "compute in float16); \"bfloat16\" is the CPU's 16-bit autocast (no loss scale needed)");
  }
  if (cfg_.lora() && cfg_.model.lora.base_dtype != "float32" && amp_ == c10::kFloat) {
    throw Error("model.lora.base_dtype \"" + cfg_.model.lora.base_dtype + "\" computes in 16 bits and needs autocast: "
                "set amp.dtype to \"bfloat16\" or \"float16\" (on the CPU \"auto\" means none)");
  }
  nonfinite_steps_ = torch::zeros({}, torch::TensorOptions().device(device_));
  // The precomputed reference is the initial model's: scored before a checkpoint's weights load.
  if (cfg_.preference_training()) reference_ = make_preference_reference(cfg_, model_, amp_, comm_, device_, split_.micro);
  const auto trained = trained_parameters(model_);
  for (const auto& [name, p] : trained) params_.push_back(p);
  optimizer_ = make_optimizer(cfg_, comm_, device_, trained);
  scaler_ = make_scaler(cfg_, amp_, device_);
  state_ = checkpoints_.resume(model_, *optimizer_, scaler_ ? &*scaler_ : nullptr, split_);
  check_best_folder();
  // The run's record, written only once the checkpoint (if any) was found to be of this run.
  // Not config.json: that name is a model folder's, and a user's own run.json may be it.
  if (comm_.is_main()) write_file_atomic(fs::path(cfg_.output_dir) / "train_config.json", cfg_.to_json().dump(2) + "\n");
  if (reference_) reference_->save(comm_);
  stop_if_requested("resuming");
  start_every_rank_alike();

  loader_ = make_loader();
  objective_ = cfg_.preference_training() ? make_preference_objective({cfg_.dpo.loss, cfg_.dpo.beta, cfg_.dpo.label_smoothing},
                                                      cfg_.train.chunked_loss, split_.global, *reference_)
                          : make_objective(loader_->has_targets(), cfg_.train.chunked_loss);
  stop_if_requested("opening the data");
  max_steps_ = steps_to_run();
  schedule_ = {cfg_.train.lr_schedule, cfg_.train.lr, cfg_.train.min_lr, cfg_.train.warmup_steps, max_steps_};
  warn_if_the_schedule_moved();
  reducer_ = std::make_unique<GradReducer>(comm_, params_, static_cast<int64_t>(cfg_.distributed.bucket_mb * (1 << 20)));
  validation_ = std::make_unique<Validation>(cfg_, split_.micro, amp_, comm_, device_, reference_.get());
  MetricsLog::Rates rates;
  rates.tokens_per_step = static_cast<double>(split_.global * rows_per_sample() * cfg_.data.seq_len);
  rates.flops_per_token = model_flops_per_token(model_->config(), cfg_.data.seq_len);
  if (device_.is_cuda()) rates.peak_flops = gpu_peak_flops(cuda_device_name(device_)) * static_cast<double>(split_.world);
  metrics_ = std::make_unique<MetricsLog>(fs::path(cfg_.output_dir) / "metrics.jsonl", cfg_.log.progress, max_steps_,
                                          comm_.is_main(), rates,
                                          cfg_.log.tensorboard ? fs::path(cfg_.output_dir) / "tensorboard" : fs::path());
  if (!state_.source.empty()) {  // the rows after this one continue from the checkpoint, not the row before
    nlohmann::json resumed = {{"checkpoint", state_.source.string()},
                              {"step", state_.step},
                              {"micro_batch_size", split_.micro},
                              {"world_size", split_.world}};
    if (!state_.changed_settings.empty()) resumed["changed"] = state_.changed_settings;  // a lever's conversion
    metrics_->record_resume(state_.step, resumed);
  } else {
    metrics_->record_fresh_start(state_.step);
  }
  log_run();
}

// Identical start on every rank; dropout draws differ per rank (rank 0 continues the
// single-process stream) unless the checkpoint restored each rank's own state.
// Preference shards train (and validate) under DPO, and only they do: refused before anything
// is scored, made or written.
void Trainer::check_data_fits_objective() const {
  // A damaged or empty first shard is said to be so (its header checked on opening), not taken
  // for another kind of data.
  ShardReader(expand_glob(cfg_.data.train, "data.train").front());
  if (!cfg_.data.val.empty()) ShardReader(expand_glob(cfg_.data.val, "data.val").front());
  const bool pairs = shards_hold_pairs(cfg_.data.train);
  if (pairs != cfg_.preference_training()) {
    throw Error(cfg_.preference_training()
                    ? "train.objective \"dpo\" trains on preference shards (tokenize --prompt-field --chosen-field "
                      "--rejected-field), and data.train (" + cfg_.data.train + ") holds " +
                          (shards_hold_documents(cfg_.data.train) ? "documents" : "plain text")
                    : "data.train (" + cfg_.data.train + ") holds preference pairs: set train.objective \"dpo\" to "
                      "train on them");
  }
  if (pairs && !cfg_.data.val.empty() && !shards_hold_pairs(cfg_.data.val)) {
    expand_glob(cfg_.data.val, "data.val");  // no match: that error first
    throw Error("data.val (" + cfg_.data.val + ") holds no preference pairs: train.objective \"dpo\" validates on "
                "preference shards (tokenize --chosen-field --rejected-field), or leave data.val empty");
  }
}

void Trainer::start_every_rank_alike() {
  {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> tensors;
    for (const auto& p : model_->parameters()) tensors.push_back(p);
    for (const auto& b : model_->buffers()) tensors.push_back(b);
    comm_.broadcast_(tensors, 0, "initial weights");
  }
  if (comm_.rank() > 0 && !state_.rng_restored) {
    torch::manual_seed(static_cast<uint64_t>(cfg_.train.seed) + 7919ull * comm_.rank() + 1000003ull * state_.step);
  }
}

std::unique_ptr<DataLoader> Trainer::make_loader() const {
  LoaderOptions lo;
  lo.shards = expand_glob(cfg_.data.train, "data.train");
  lo.seq_len = cfg_.data.seq_len;
  lo.micro_batch = split_.micro;
  lo.seed = static_cast<uint64_t>(cfg_.data.seed);
  lo.shuffle = cfg_.data.shuffle;
  lo.num_workers = static_cast<int>(cfg_.data.num_workers);
  lo.prefetch = 2 * lo.num_workers + 2;
  lo.rank = comm_.rank();
  lo.world_size = static_cast<int>(split_.world);
  lo.vocab_size = model_->config().vocab_size;
  lo.packing = cfg_.data.packing;
  lo.too_long = cfg_.data.too_long;
  lo.device = device_;
  if (state_.source.empty()) return std::make_unique<DataLoader>(lo, state_.loader);
  return with_context("resuming from checkpoint " + state_.source.string(),
                      [&] { return std::make_unique<DataLoader>(lo, state_.loader); });
}

int64_t Trainer::steps_to_run() const {
  if (cfg_.train.max_steps > 0) return cfg_.train.max_steps;
  return static_cast<int64_t>(std::ceil(cfg_.train.epochs * loader_->samples_per_epoch() / split_.global));
}

// A resume whose max_steps (or epochs) differs from the checkpoint's run moves the learning
// rate schedule, which ends at the run's last step: said, with the rate before and after.
void Trainer::warn_if_the_schedule_moved() const {
  if (state_.source.empty()) return;
  try {
    const nlohmann::json meta = read_json_file((state_.source / "trainer_state.json").string());
    const nlohmann::json& train = meta.at("config").at("train");
    const int64_t saved_max = train.value("max_steps", int64_t{0});
    const double saved_epochs = train.value("epochs", 0.0);
    const int64_t was = saved_max > 0 ? saved_max
                                      : static_cast<int64_t>(std::ceil(saved_epochs * loader_->samples_per_epoch() /
                                                                       static_cast<double>(split_.global)));
    if (was <= 0 || was == max_steps_) return;
    LrSchedule before = schedule_;
    before.max_steps = was;
    spdlog::warn("the run's length changed on resume: {} steps, the checkpoint's run {} ({}); the {} learning rate "
                 "schedule now ends at step {}: at step {} it is {:.3e} (it would have been {:.3e})",
                 max_steps_, was, saved_max > 0 || cfg_.train.max_steps > 0 ? "train.max_steps" : "train.epochs",
                 cfg_.train.lr_schedule, max_steps_, state_.step + 1, schedule_.at(state_.step),
                 before.at(state_.step));
  } catch (const std::exception&) {
    // an older checkpoint without its config: nothing to compare
  }
}

void Trainer::log_run() {
  const GPT2Config& mc = model_->config();
  int64_t trained = 0;
  for (const auto& p : params_) trained += p.numel();
  const int64_t W = split_.world;
  spdlog::info("model: {} parameters ({} trained); device {}{}; micro batch {} x accumulation {}{} = global batch {} "
               "{} of {} tokens; {} steps ({:.2f} epochs of {} samples); amp {}{}; AdamW {}",
               mc.num_parameters(), trained, device_.str(),
               device_.is_cuda() ? " (" + cuda_device_name(device_) + ")" : "", split_.micro, split_.accumulation(),
               W > 1 ? fmt::format(" x {} ranks", W) : "", split_.global,
               rows_per_sample() == 2 ? "preference pairs (two rows each)" : "sequences", cfg_.data.seq_len, max_steps_,
               static_cast<double>(max_steps_ * split_.global) / loader_->samples_per_epoch(),
               loader_->samples_per_epoch(), amp_name(amp_), cfg_.amp.dtype == "auto" ? " (auto)" : "",
               cfg_.train.optimizer == "adamw_8bit"
                   ? (cfg_.train.optimizer_offload == "cpu" ? "8-bit (torchao's AdamW8bit) on the host"
                                                            : "8-bit (torchao's AdamW8bit)")
               : cfg_.train.optimizer_offload == "cpu" ? "on the host (fused)"
               : fused_adamw(cfg_, device_)            ? "fused"
                                                       : "unfused");
  spdlog::info("data: {}{}", loader_->describe(),
               cfg_.preference_training()
                   ? fmt::format("; DPO ({} loss, beta {:g}, reference {}): a step's loss is the mean over its global "
                                 "batch's {} pairs", cfg_.dpo.loss, cfg_.dpo.beta, cfg_.dpo.reference, split_.global)
               : loader_->has_targets() ? "; a step's loss is the mean over its global batch's targets"
                                        : "");
  if (device_.is_cuda()) {
    spdlog::info("{}", describe_attention_kernels(mc, device_, amp_, cfg_.data.seq_len, mc.attn_pdrop,
                                                  model_->packed_attention()));
  }
  if (W > 1) {
    spdlog::info("gradients: {} bucket(s), {:.1f} MiB, all-reduced during the backward of the last micro batch",
                 reducer_->num_buckets(), reducer_->bucket_bytes_total() / double(1 << 20));
  }
}

TrainSummary Trainer::run() {
  metrics_->start_interval();
  first_step_ = state_.step;
  const int64_t patience = cfg_.eval.early_stopping_patience;
  if (patience > 0 && state_.evals_without_improvement >= patience) {  // the run had stopped early
    spdlog::info("the run had stopped early at step {} ({} validations without improvement)", state_.step,
                 state_.evals_without_improvement);
    early_stopped_ = true;
    last_val_step_ = state_.step;
  }
  // The metrics' peaks are the training steps' (what the planner predicts), not loading's.
  if (device_.is_cuda()) cuda_reset_peak_memory(device_);
  else if (counting_cpu_allocator_installed()) reset_cpu_memory_peaks();
  for (int64_t step = first_step_; step < max_steps_ && !early_stopped_; ++step) {
    const StepResult result = train_step(step);
    state_.step = step + 1;
    after_step(step, result);
  }
  return finish();
}

// One optimizer step over the global batch: forward and backward over this rank's micro
// batches (the last backward also averages the gradients over the ranks); every rank agrees
// on the outcome; then unscale, clip, step and update the loss scale. After running out of
// memory anywhere, every rank backs off and redoes the step from its first sample.
StepResult Trainer::train_step(int64_t step) {
  StepResult r;
  r.lr = schedule_.at(step);
  for (;;) {
    const StepStart start{loader_->state(), get_rng_states(device_)};
    std::string oom_message;
    bool interrupted = false;
    poison_loss_ = nan_loss_at_step(step + 1);
    r.loss = forward_backward(oom_message, interrupted, r.metrics);
    if (interrupted) interrupt(step, start);
    reducer_->finish();  // every rank issues the same collectives, even after an error
    optimizer_->end_backward();
    const bool out_of_time = cfg_.train.time_limit > 0 &&
                             std::chrono::duration<double>(Clock::now() - start_).count() > cfg_.train.time_limit;
    r.outcome = agree_on_step(comm_, {!oom_message.empty(), StopSignals::requested(), out_of_time});
    if (!r.outcome.out_of_memory) break;
    back_off(step, oom_message, start);  // or checkpoint and exit, or fail
  }
  fatal_if_out_of_memory("in the optimizer step of step " + std::to_string(step + 1), [&] { apply_step(r); });
  return r;
}

// Unscale, clip, the optimizer's step and the loss scale's update. Every optimizer allocates
// what its CPU step needs before changing a tensor, so running out of memory here leaves the
// weights of the step before.
void Trainer::apply_step(StepResult& r) {
  MemoryPhaseScope phase(MemoryPhase::kOptimizer);
  const std::vector<torch::Tensor> grads = gradients_of(params_);
  GradientScaling scaling;
  if (scaler_) {
    scaler_->unscale_(grads);
    if (comm_.active()) {  // every rank skips the same steps
      const double any_inf = comm_.reduce_device_scalars({scaler_->found_inf()}, HostReduce::max, "found_inf")[0];
      scaler_->found_inf().fill_(any_inf);
    }
    scaling.found_inf = scaler_->found_inf();
    scaling.inv_scale = scaler_->inv_scale();
  }
  const ClippedNorm clipped = clip_grad_norm_(grads, cfg_.train.grad_clip);
  r.grad_norm = clipped.norm;
  scaling.clip_coef = clipped.coef;
  if (!scaler_) {  // float16's loss scale skips its own overflow steps; any other is skipped and stops the run
    scaling.found_inf = torch::isfinite(clipped.norm).logical_not().to(torch::kFloat);
    nonfinite_steps_.add_(scaling.found_inf->to(nonfinite_steps_.device()));
  }
  optimizer_->step(r.lr, scaling);  // a no-op on inf/NaN gradients
  if (scaler_) scaler_->update();
  clear_gradients(params_);
}

// Forward and backward over this rank's micro batches. Each loss is the objective's share
// (train/objective.h), so the gradients sum to the global batch's mean: plain text, a micro
// batch's mean over the accumulation; document shards, its summed target loss over the global
// batch's target count / ranks (counted before the step from the loader, the same on every
// rank). Running out of memory is caught, its message handed back and the partial gradients
// dropped, so that all ranks can agree on what to do; a stop signal in one process drops the
// step the same way.
torch::Tensor Trainer::forward_backward(std::string& oom_message, bool& interrupted, torch::Tensor& metrics) {
  const int64_t accumulation = split_.accumulation();
  const int64_t targets = objective_->counts_targets() ? loader_->targets_in_next(split_.global) : 0;
  if (objective_->counts_targets() && targets == 0) {  // the same on every rank
    const LoaderState at = loader_->state();
    throw Error(fmt::format(
        "the global batch of step {} ({} samples from sample {} of epoch {}) holds no target: its loss would be 0 and "
        "it would train nothing. Some documents of data.train have no target at data.seq_len {}; check the target "
        "flags the shards were written with, or raise data.seq_len. The last checkpoint is intact",
        state_.step + 1, split_.global, at.consumed, at.epoch, cfg_.data.seq_len));
  }
  const double divisor = objective_->divisor(accumulation, split_.world, targets);
  torch::Tensor loss_sum = torch::zeros({}, torch::TensorOptions().device(device_));
  metrics = torch::Tensor();
  try {
    for (int64_t m = 0; m < accumulation; ++m) {
      // One process stops mid-step when asked (ranks agree only at the step's end).
      if (split_.world == 1 && m > 0 && StopSignals::requested() != 0) {
        interrupted = true;
        clear_gradients(params_);
        return loss_sum;
      }
      const Batch batch = loader_->next();
      torch::Tensor loss;
      {
        MemoryPhaseScope phase(MemoryPhase::kForward);
        ObjectiveLoss out = micro_batch_loss(batch, divisor);
        loss = out.loss;
        if (out.metrics.defined()) metrics = metrics.defined() ? metrics + out.metrics : out.metrics;
      }
      if (poison_loss_) loss = loss * std::numeric_limits<double>::quiet_NaN();  // fault injection
      loss_sum += loss.detach();
      if (m == accumulation - 1) {
        reducer_->arm();
        optimizer_->begin_last_backward();
      }
      MemoryPhaseScope phase(MemoryPhase::kBackward);
      (scaler_ ? scaler_->scale(loss) : loss).backward();
    }
  } catch (const std::exception& e) {
    if (!is_out_of_memory(e)) throw;
    oom_message = describe_exception(e);
    optimizer_->end_backward();  // before the gradients are freed
    clear_gradients(params_);    // nothing was applied
  }
  return loss_sum;
}

// One micro batch's (B, T) share of this rank's loss, under the run's autocast.
ObjectiveLoss Trainer::micro_batch_loss(const Batch& batch, double divisor) {
  AutocastGuard autocast(device_.type(), amp_);
  maybe_inject_oom(split_.micro);
  return objective_->loss(model_, batch, divisor);
}

// Some rank ran out of memory: every rank dropped the step; all change the micro batch
// together and rewind to the step's first sample and RNG state.
void Trainer::back_off(int64_t step, std::string why, const StepStart& start) {
  if (why.empty()) why = "another rank ran out of memory";
  clear_gradients(params_);
  release_cached_memory(device_);
  const BatchSplit failed = split_;
  const OomDecision decision = backoff_.decide(step, failed, why);  // throws under oom.policy "fail"
  state_.micro_batch_from_oom = true;
  split_.micro = decision.next_micro;
  loader_->restart(start.loader, split_.micro);
  set_rng_states(start.rng);
  if (decision.exit) {
    const fs::path saved = save_checkpoint();
    const std::string advice = decision.lowered ? "" : fit_advice(saved, step);
    throw backoff_.exit_request(step, failed, decision, saved, advice);
  }
  spdlog::warn(backoff_.backoff_warning(step, failed, decision, why));
  validation_->training_micro_batch_changed(split_.micro);
}

// What `plan` recommends for this run on this device at the current (smallest) micro batch,
// as commands to run: the levers a resume converts continue the checkpoint `saved` (after
// `step` steps) at its next sample; those that make another run (other samples, another
// trained set) start a new run from its weights in a new output_dir.
std::string Trainer::fit_advice(const fs::path& saved, int64_t step) const {
  try {
    const MemoryAdvice advice = memory_levers(cfg_, split_.world, split_.micro, plannable_memory(cfg_, device_));
    const MemoryLever& c = advice.combined;
    const std::string gpus = c.world_size > split_.world ? fmt::format(" on {} GPUs", c.world_size) : "";
    std::string text = fmt::format("plan's advice for {}: {} (predicted peak {} at micro batch {}{})",
                                   format_memory(advice.budget), c.name, format_memory(c.peak), advice.micro_batch,
                                   advice.combined_fits ? "" : "; even that does not fit");
    if (c.new_run_settings.empty()) {
      return text + ". Run the same command again" + gpus + " with" + set_flags(c.settings) +
             ": it resumes from the checkpoint at the next sample, with the same global batch";
    }
    // A new run from the checkpoint's weights: the model folder, or with LoRA its adapter.
    const std::string init = (cfg_.lora() ? "model.lora.init_from=" : "model.init_from=") + saved.string();
    const std::string folder = fmt::format("{}-from-step-{}", fs::path(cfg_.output_dir).lexically_normal().string(), step);
    return text + ". Part of it makes another run (" + set_flags(c.new_run_settings).substr(1) +
           " changes the samples or what trains), which cannot continue this checkpoint: start a new run from its "
           "weights in another output_dir, with the same command" + gpus + " and --set " + init + " --set output_dir=" +
           folder + set_flags(c.settings) + set_flags(c.new_run_settings);
  } catch (const std::exception&) {
    return "";  // the advice is a courtesy: the exit and its message stand without it
  }
}

void Trainer::after_step(int64_t step, const StepResult& result) {
  const int64_t done = step + 1;
  const bool last = done == max_steps_;
  const bool log = done % cfg_.log.every_steps == 0 || last || step == first_step_;
  metrics_->step_done(done, log);
  interval_loss_ = interval_loss_.defined() ? interval_loss_ + result.loss : result.loss.clone();  // no sync
  if (result.metrics.defined()) {
    interval_metrics_ = interval_metrics_.defined() ? interval_metrics_ + result.metrics : result.metrics.clone();
  }
  ++interval_steps_;
  if (log) log_step(step, result);
  if (evaluation_due(done) && !last) validate(done);
  if (early_stopped_) return;  // finish() saves the final model and the checkpoint
  if (cfg_.checkpoint.every_steps > 0 && done % cfg_.checkpoint.every_steps == 0 && !last) save_checkpoint();
  maybe_crash_after_step(done);
  // A stop request (a signal or the time limit, on any rank) ends the run at this step
  // boundary, resumably, on every rank.
  if (result.outcome.stop_requested() && !last) stop(step, result.outcome);
}

// Metrics only at log steps: the only host syncs of the loop.
// Its loss is the mean over the steps since the last row (HF Trainer's interval mean).
void Trainer::log_step(int64_t step, const StepResult& r) {
  const double loss = comm_.reduce_device_scalars({interval_loss_}, HostReduce::sum, "training loss")[0] /
                      static_cast<double>(split_.world) / static_cast<double>(interval_steps_);
  const int64_t averaged = interval_steps_;
  interval_loss_ = torch::Tensor();
  interval_steps_ = 0;
  stop_if_not_finite(step + 1);
  const LoaderState at = loader_->state();
  nlohmann::json row = {{"step", step + 1},
                        {"time", unix_time()},
                        {"loss", loss},
                        {"loss_steps", averaged},
                        {"lr", r.lr},
                        {"grad_norm", r.grad_norm.item<double>()},
                        {"epoch", at.epoch},
                        {"samples_in_epoch", at.consumed},
                        {"fractional_epoch", static_cast<double>(at.epoch) +
                                                 static_cast<double>(at.consumed) /
                                                     static_cast<double>(loader_->samples_per_epoch())},
                        {"global_batch", split_.global},
                        {"tokens_seen", (step + 1) * split_.global * rows_per_sample() * cfg_.data.seq_len},
                        {"micro_batch", split_.micro}};
  if (split_.world > 1) row["world_size"] = split_.world;
  if (interval_metrics_.defined()) {  // the objective's own (DPO: TRL's rewards/*, logps/*), averaged over its examples
    std::vector<torch::Tensor> sums;
    for (int64_t i = 0; i < interval_metrics_.size(0); ++i) sums.push_back(interval_metrics_[i]);
    const std::vector<double> total = comm_.reduce_device_scalars(sums, HostReduce::sum, "objective metrics");
    const std::vector<std::string> names = objective_->metric_names();
    for (size_t i = 0; i + 1 < names.size(); ++i) row[names[i]] = total[i] / total.back();
    interval_metrics_ = torch::Tensor();
  }
  if (device_.is_cuda()) {
    const CudaMemory mem = cuda_memory(device_);
    row["cuda_peak_allocated_gb"] = mem.peak_allocated / 1e9;
    row["cuda_peak_reserved_gb"] = mem.peak_reserved / 1e9;
  } else if (counting_cpu_allocator_installed()) {
    const CpuMemoryCounts mem = cpu_memory_counts();
    row["cpu_peak_allocated_gb"] = mem.peak / 1e9;
    nlohmann::json phases;
    for (int p = 1; p < kMemoryPhases; ++p) {
      const int64_t bytes = mem.phase_peak[static_cast<size_t>(p)];
      if (bytes > 0) phases[memory_phase_name(static_cast<MemoryPhase>(p))] = bytes / 1e9;
    }
    row["cpu_peak_by_phase_gb"] = phases;
  }
  if (scaler_) {
    row["loss_scale"] = scaler_->scale_tensor().item<double>();
    row["skipped_steps"] = static_cast<int64_t>(scaler_->skipped_steps().item<double>());
  }
  metrics_->record_step(row);
  if (!logged_first_) summary_.first_loss = loss, logged_first_ = true;
  summary_.last_loss = loss;
}

// Validation after eval.every_steps steps, and each time eval.every_epochs epochs of samples
// have been trained (fractions allowed).
bool Trainer::evaluation_due(int64_t done) const {
  if (cfg_.eval.every_steps > 0 && done % cfg_.eval.every_steps == 0) return true;
  if (cfg_.eval.every_epochs <= 0) return false;
  const double period = cfg_.eval.every_epochs * static_cast<double>(loader_->samples_per_epoch());  // samples
  const auto crossings = [&](int64_t steps) {
    return std::floor(static_cast<double>(steps * split_.global) / period + 1e-9);
  };
  return crossings(done) > crossings(done - 1);
}

std::optional<double> Trainer::validate(int64_t step) {
  if (step == last_val_step_) return last_val_loss_;  // the end of a run stopped early after its validation
  std::optional<EvalResult> r;
  {
    MemoryPhaseScope phase(MemoryPhase::kValidation);
    r = fatal_if_out_of_memory("in validation at step " + std::to_string(step) + ", even at one window per forward pass",
                               [&] { return validation_->run(model_); });
  }
  if (!r) return std::nullopt;
  if (!std::isfinite(r->loss)) {  // the weights went non-finite: never a NaN reported as a result, with exit 0
    throw Error(fmt::format("the validation loss at step {} is {}: the weights hold non-finite values or the model "
                            "overflows. Nothing is saved after this ({}); resume from it with a lower train.lr, or check "
                            "the checkpoint's optimizer state",
                            step, r->loss, last_checkpoint_words()));
  }
  nlohmann::json row = {{"step", step},
                        {"time", unix_time()},
                        {"fractional_epoch", static_cast<double>(step * split_.global) /
                                                 static_cast<double>(loader_->samples_per_epoch())},
                        {"val_loss", r->loss},
                        {"val_tokens", r->tokens}};
  if (r->metrics.empty()) row["val_perplexity"] = r->perplexity;  // not of a DPO loss
  for (const auto& [name, value] : r->metrics) row["val_" + name] = value;
  metrics_->record_validation(row);
  last_val_step_ = step;
  last_val_loss_ = r->loss;
  track_best(step, r->loss);
  return r->loss;
}

// The best validation loss so far: best/ (checkpoint.keep_best) and early stopping. Both
// live in the checkpoints' state, so a resumed run continues them.
void Trainer::track_best(int64_t step, double loss) {
  const std::optional<double> before = state_.best_val_loss;
  const bool improved = !before || loss < *before;
  const bool enough = !before || loss < *before - cfg_.eval.early_stopping_min_delta;
  if (improved) {
    state_.best_val_loss = loss;
    state_.best_step = step;
    if (cfg_.checkpoint.keep_best) {
      comm_.barrier("best model");  // every rank's weights are this step's
      if (comm_.is_main()) {
        save_best(step, loss);
      }
    }
  }
  state_.evals_without_improvement = enough ? 0 : state_.evals_without_improvement + 1;
  const int64_t patience = cfg_.eval.early_stopping_patience;
  if (patience > 0 && state_.evals_without_improvement >= patience && step < max_steps_) {
    early_stopped_ = true;
    const std::string why = fmt::format(
        "early stopping: {} validation(s) without an improvement of more than {:g} below the best loss {:.4f} "
        "(step {}); the run ends here at step {} (eval.early_stopping_patience {})",
        state_.evals_without_improvement, cfg_.eval.early_stopping_min_delta, *state_.best_val_loss,
        state_.best_step, step, patience);
    spdlog::info("{}", why);
    metrics_->record_event({{"step", step},
                            {"time", unix_time()},
                            {"early_stop", {{"reason", why},
                                            {"best_val_loss", *state_.best_val_loss},
                                            {"best_step", state_.best_step},
                                            {"evals_without_improvement", state_.evals_without_improvement}}}});
  }
}

// A step whose gradients were NaN or infinite (outside float16's own skipped steps) was not
// applied (AdamW's found_inf), so the weights are still those of the last finite step; the
// run stops at the next log step or save, with nothing written, the last checkpoint intact.
void Trainer::stop_if_not_finite(int64_t step) {
  const double bad = comm_.reduce_device_scalars({nonfinite_steps_}, HostReduce::max, "the non-finite step count")[0];
  if (bad == 0) return;
  throw Error(fmt::format(
      "the gradients were NaN or infinite in {} step(s) by step {}: those updates were skipped and the run stops here "
      "without saving ({}). Likely causes: a learning rate too high (train.lr {:g}), no clipping (train.grad_clip), "
      "too large a loss scale or bad data; resume from the checkpoint with a lower train.lr",
      static_cast<int64_t>(bad), step, last_checkpoint_words(), cfg_.train.lr));
}

// For a run that stops without saving: which checkpoint it can resume from.
std::string Trainer::last_checkpoint_words() const {
  const auto latest = latest_checkpoint(cfg_.output_dir);
  return latest ? "the last checkpoint, " + latest->string() + ", is intact" : "no checkpoint was written yet";
}

fs::path Trainer::save_checkpoint() {
  MemoryPhaseScope phase(MemoryPhase::kSave);
  stop_if_not_finite(state_.step);
  state_.micro_batch = split_.micro;
  state_.loader = loader_->state();
  return fatal_if_out_of_memory("while saving the checkpoint of step " + std::to_string(state_.step), [&] {
    return checkpoints_.save(state_, model_, *optimizer_, scaler_ ? &*scaler_ : nullptr);
  });
}

void Trainer::stop(int64_t step, const StepOutcome& outcome) {
  metrics_->clear_bar();
  const fs::path saved = save_checkpoint();
  const std::string why = outcome.stop_signal ? std::string("signal ") + strsignal(outcome.stop_signal)
                                              : "train.time_limit of " + std::to_string(cfg_.train.time_limit) + "s";
  throw ExitRequest(kExitStopped, "stopped by " + why + " after step " + std::to_string(step + 1) + "; saved " +
                                      saved.string() + ". Run again with checkpoint.resume \"auto\" to continue");
}

// final/: a Hugging Face model folder, or with LoRA a PEFT adapter folder naming the base.
void Trainer::save_final_model() {
  // (finish() checked the steps' gradients on every rank before this rank-0-only save.)
  save_model(fs::path(cfg_.output_dir) / "final");
}

// best/ is replaced whenever validation improves, so it must be this run's: written by the run
// whose checkpoint this one continues (best.json records the run fingerprint). A resumed run
// whose best/ has gone says so; the end of the run names best/ only if it is there.
void Trainer::check_best_folder() {
  const fs::path best = fs::path(cfg_.output_dir) / "best";
  if (!cfg_.checkpoint.keep_best) return;
  if (!fs::exists(best)) {
    if (state_.best_val_loss && !state_.source.empty()) {
      spdlog::warn("{} is missing: the checkpoint names a best model at step {} (val loss {:.4f}) that is gone; the "
                   "next validation loss below it writes a new one", best.string(), state_.best_step,
                   *state_.best_val_loss);
    }
    return;
  }
  const std::string ways = "checkpoint.keep_best would replace it. Move it away, choose another output_dir, or set "
                           "checkpoint.keep_best false";
  if (!fs::exists(best / "best.json")) {
    throw Error(best.string() + " exists and is not a best model this trainer wrote (it has no best.json); " + ways);
  }
  const nlohmann::json written = read_json_file((best / "best.json").string());
  std::vector<std::string> changed = fingerprint_differences(
      written.is_object() && written.contains("fingerprint") ? written["fingerprint"] : nlohmann::json(),
      state_.fingerprint);
  if (state_.source.empty()) changed.insert(changed.begin(), "this run starts afresh (no checkpoint of it was resumed)");
  if (!changed.empty()) {
    std::string list;
    for (const auto& c : changed) list += "\n  " + c;
    throw Error(best.string() + " is the best model of another run:" + list + "\n" + ways);
  }
}

// best/: written complete under a temporary name, then renamed into place; the folder it
// replaces is removed only after that, so a crash leaves one whole best/ (or a leftover to delete).
void Trainer::save_best(int64_t step, double loss) {
  const fs::path out(cfg_.output_dir), best = out / "best";
  const std::string pid = std::to_string(::getpid());
  const fs::path temp = out / (".best.tmp." + pid), old = out / (".best.old." + pid);
  std::error_code ec;
  fs::remove_all(temp, ec);
  save_model(temp);
  write_file_atomic(temp / "best.json",
                    nlohmann::json{{"step", step}, {"val_loss", loss}, {"fingerprint", state_.fingerprint}}.dump(2) + "\n");
  if (fs::exists(best)) fs::rename(best, old);
  fs::rename(temp, best);
  fsync_directory(out);
  fs::remove_all(old, ec);
  spdlog::info("best validation loss so far ({:.4f} at step {}): saved {}", loss, step, best.string());
}

// The model folder, or with LoRA the adapter folder, into `dir`.
void Trainer::save_model(const fs::path& dir) {
  MemoryPhaseScope phase(MemoryPhase::kSave);
  fatal_if_out_of_memory("while saving " + dir.string(), [&] { write_model(dir); });
}

void Trainer::write_model(const fs::path& dir) {
  SaveModelOptions save;
  save.dtype = cfg_.save_dtype == "bfloat16" ? c10::kBFloat16 : cfg_.save_dtype == "float16" ? c10::kHalf : c10::kFloat;
  if (!cfg_.model.init_from.empty()) save.tokenizer_from = model_tokenizer_folder(cfg_.model.init_from);
  if (!model_->lora()) {
    save_model_folder(model_, dir, save);
  } else {
    save_adapter_folder(model_, *model_->lora(), dir,
                        cfg_.model.init_from.empty() ? cfg_.model.preset : fs::absolute(cfg_.model.init_from).string());
    if (save.tokenizer_from) copy_tokenizer_files(*save.tokenizer_from, dir);
  }
  // Conversations: the template and its tokens travel with the model, for transformers and generate --chat.
  if (chat_) write_chat_tokenizer_files(*chat_, dir);
}

// A stop signal during setup: nothing new to save (the last checkpoint, if any, stands).
void Trainer::stop_if_requested(const char* during) const {
  if (const int signum = StopSignals::requested()) {
    throw ExitRequest(kExitStopped, std::string("stopped by signal ") + strsignal(signum) + " while " + during +
                                        "; nothing new to save. Run again to continue");
  }
}

// A stop signal in the middle of step `step` (one process): the step is dropped, the loader
// and RNG rewound to its start, and the last completed step checkpointed.
void Trainer::interrupt(int64_t step, const StepStart& start) {
  loader_->restart(start.loader, split_.micro);
  set_rng_states(start.rng);
  StepOutcome outcome;
  outcome.stop_signal = StopSignals::requested();
  stop(step - 1, outcome);
}

// The end of the run: final validation, checkpoint and model folder.
TrainSummary Trainer::finish() {
  metrics_->clear_bar();
  summary_.steps = state_.step;
  summary_.micro_batch = split_.micro;
  summary_.accumulation = split_.accumulation();
  if (state_.step >= max_steps_ && !logged_first_) spdlog::info("the run is already complete ({} steps)", max_steps_);
  summary_.val_loss = validate(summary_.steps);
  if (cfg_.checkpoint.at_end) save_checkpoint();
  stop_if_not_finite(state_.step);  // also every rank's barrier before rank 0 reads the weights
  if (end_.save_final_model) {
    summary_.final_model = fs::path(cfg_.output_dir) / "final";
    if (comm_.is_main()) save_final_model();
    comm_.barrier("final model");
  }
  if (const std::string report = optimizer_->run_report(); !report.empty()) spdlog::info("{}", report);
  summary_.seconds = std::chrono::duration<double>(Clock::now() - start_).count();
  const std::string trained = state_.step > first_step_
                                  ? fmt::format("train loss {:.4f} -> {:.4f}", summary_.first_loss, summary_.last_loss)
                                  : "no step trained in this invocation (the run was already complete)";
  std::string best;
  if (state_.best_val_loss) {
    const fs::path folder = fs::path(cfg_.output_dir) / "best";
    bool there = false;
    if (cfg_.checkpoint.keep_best && fs::exists(folder / "best.json")) {
      const nlohmann::json written = read_json_file((folder / "best.json").string());
      there = written.is_object() && written.value("step", nlohmann::json()) == nlohmann::json(state_.best_step);
    }
    best = fmt::format("; best val loss {:.4f} at step {}{}", *state_.best_val_loss, state_.best_step,
                       there ? " in " + folder.string()
                             : cfg_.checkpoint.keep_best ? " (its folder best/ is missing or of another step)" : "");
  }
  spdlog::info("done: the run is at step {} of {}{} ({} trained in this invocation, {:.1f}s); {}{}{}; {}", summary_.steps,
               max_steps_, early_stopped_ ? " (stopped early)" : "", summary_.steps - first_step_, summary_.seconds,
               trained,
               summary_.val_loss ? fmt::format("; val loss {:.4f}", *summary_.val_loss) : "", best,
               end_.save_final_model ? "model saved to " + summary_.final_model.string() : "no model saved");
  return summary_;
}

}  // namespace

TrainSummary run_training(const TrainConfig& config, const RunEnd& end) { return Trainer(config, end).run(); }

}  // namespace gpt2ft
