// The training loop. The step reads like the algorithm; details live in the helpers above it.
#include "gpt2ft/train/trainer.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <mutex>
#include <cmath>
#include <cstdio>
#include <fstream>

#include <ATen/autocast_mode.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/autocast.h"
#include "gpt2ft/core/cuda_info.h"
#include "gpt2ft/core/device.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/out_of_memory.h"
#include "gpt2ft/core/rng_state.h"
#include "gpt2ft/data/loader.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/dist/communicator.h"
#include "gpt2ft/dist/grad_reducer.h"
#include "gpt2ft/dist/launch_env.h"
#include "gpt2ft/dist/optimizer_shards.h"
#include "gpt2ft/eval/evaluate.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/model/finetune.h"
#include "gpt2ft/model/init.h"
#include "gpt2ft/train/adamw.h"
#include "gpt2ft/train/checkpoint.h"
#include "gpt2ft/train/grad_scaler.h"
#include "gpt2ft/train/lr_schedule.h"

namespace gpt2ft {
namespace fs = std::filesystem;
namespace {

using Clock = std::chrono::steady_clock;

GPT2 build_model(const TrainConfig& cfg, c10::Device device) {
  auto set_dropout = [&](GPT2Config& c) {
    if (cfg.model.dropout >= 0) c.resid_pdrop = c.embd_pdrop = c.attn_pdrop = cfg.model.dropout;
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
  if (cfg.model.resize_vocab > 0 && cfg.model.resize_vocab != model->config().vocab_size) {
    spdlog::info("resizing the vocabulary from {} to {}", model->config().vocab_size, cfg.model.resize_vocab);
    model = resize_vocab(model, cfg.model.resize_vocab);
  }
  model->set_activation_checkpointing(cfg.checkpoint_every_n_blocks());
  freeze(model, cfg.model.freeze_embeddings, cfg.model.freeze_blocks);
  model->to(device);
  model->train();
  return model;
}

// Global-norm gradient clipping without a host sync: returns the norm before clipping.
torch::Tensor clip_grad_norm(const std::vector<torch::Tensor>& grads, double max_norm) {
  torch::NoGradGuard no_grad;
  if (grads.empty()) return torch::zeros({});
  const auto norms = torch::_foreach_norm(grads, 2);
  const torch::Tensor total = torch::linalg_vector_norm(torch::stack(norms), 2);  // ()
  if (max_norm > 0) {
    const torch::Tensor coef = torch::clamp(max_norm / (total + 1e-6), c10::nullopt, 1.0);
    torch::_foreach_mul_(grads, coef);
  }
  return total;
}

// Metrics to the console (progress bar or lines) and <output_dir>/metrics.jsonl.
class MetricsLog {
 public:
  // Disabled (ranks other than 0), it writes nothing.
  MetricsLog(const fs::path& path, const std::string& progress, int64_t max_steps, bool enabled)
      : enabled_(enabled), max_steps_(max_steps), start_(Clock::now()) {
    if (enabled_) out_.open(path, std::ios::app);
    bar_ = enabled_ && (progress == "bar" || (progress == "auto" && ::isatty(STDERR_FILENO)));
  }
  void record(const nlohmann::json& row) {
    if (!enabled_) return;
    out_ << row.dump() << "\n";
    out_.flush();
    clear_bar();
    if (row.contains("val_loss")) {
      spdlog::info("step {:>6} | val loss {:.4f} | val perplexity {:.2f}", row["step"].get<int64_t>(),
                   row["val_loss"].get<double>(), row["val_perplexity"].get<double>());
      return;
    }
    last_loss_ = row["loss"].get<double>();
    std::string extra;
    if (row.contains("mfu")) extra += fmt::format(" | mfu {:.1f}%", 100 * row["mfu"].get<double>());
    if (row.contains("cuda_peak_allocated_gb")) {
      extra += fmt::format(" | mem {:.2f}/{:.2f} GB", row["cuda_peak_allocated_gb"].get<double>(),
                           row["cuda_peak_reserved_gb"].get<double>());
    }
    if (row.contains("loss_scale")) {
      extra += fmt::format(" | scale {:g} skipped {}", row["loss_scale"].get<double>(), row["skipped_steps"].get<int64_t>());
    }
    spdlog::info("step {:>6}/{} | loss {:.4f} | lr {:.3e} | norm {:.3f} | {:.0f} tok/s | {:.0f} ms{}",
                 row["step"].get<int64_t>(), max_steps_, last_loss_, row["lr"].get<double>(),
                 row["grad_norm"].get<double>(), row["tokens_per_s"].get<double>(), row["step_ms"].get<double>(), extra);
  }
  // A one-line bar with the last logged loss; no host sync.
  void progress(int64_t step) {
    if (!bar_) return;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    const double eta = step > 0 ? elapsed / step * (max_steps_ - step) : 0;
    const int width = 30, filled = static_cast<int>(width * step / std::max<int64_t>(1, max_steps_));
    std::fprintf(stderr, "\r[%s%s] %lld/%lld loss %.4f ETA %02d:%02d   ", std::string(filled, '#').c_str(),
                 std::string(width - filled, '.').c_str(), static_cast<long long>(step),
                 static_cast<long long>(max_steps_), last_loss_, static_cast<int>(eta) / 60, static_cast<int>(eta) % 60);
    std::fflush(stderr);
    drawn_ = true;
  }
  void clear_bar() {
    if (drawn_) std::fprintf(stderr, "\r%80s\r", "");
    drawn_ = false;
  }

 private:
  bool enabled_;
  std::ofstream out_;
  int64_t max_steps_;
  Clock::time_point start_;
  bool bar_ = false, drawn_ = false;
  double last_loss_ = NAN;
};

}  // namespace

MemoryPlanInput memory_plan_input(const TrainConfig& cfg, int64_t world_size) {
  MemoryPlanInput in;
  in.world_size = world_size;
  in.model = cfg.model.init_from.empty() ? GPT2Config::preset(cfg.model.preset)
                                         : GPT2Config::from_file(fs::path(cfg.model.init_from) / "config.json");
  if (cfg.model.dropout >= 0) in.model.resid_pdrop = in.model.embd_pdrop = in.model.attn_pdrop = cfg.model.dropout;
  if (cfg.model.resize_vocab > 0) in.model.vocab_size = cfg.model.resize_vocab;
  in.seq_len = cfg.data.seq_len;
  in.cuda = cfg.device != "cpu";
  in.amp = resolve_amp_dtype(cfg.amp.dtype, in.cuda ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU));
  in.checkpoint_every = cfg.checkpoint_every_n_blocks();
  in.dropout = in.model.resid_pdrop > 0 || in.model.attn_pdrop > 0;
  in.chunked_loss = cfg.train.chunked_loss;
  in.shard_optimizer = cfg.distributed.shard_optimizer;
  in.freeze_embeddings = cfg.model.freeze_embeddings;
  in.freeze_blocks = cfg.model.freeze_blocks;
  const int64_t accum = std::max<int64_t>(1, cfg.train.gradient_accumulation_steps);
  in.global_batch = cfg.train.global_batch_size > 0 ? cfg.train.global_batch_size
                    : cfg.micro_batch_auto()        ? 0
                                                    : cfg.train.micro_batch_size * accum * world_size;
  return in;
}

double model_flops_per_token(const GPT2Config& c, int64_t seq_len) {
  const double n = static_cast<double>(c.num_parameters() - c.n_positions * c.n_embd);
  return 6 * n + 12.0 * c.n_layer * c.n_embd * seq_len;
}

namespace {

std::atomic<int> g_stop_signal{0};

void on_stop_signal(int signum) {
  if (g_stop_signal.load() != 0 && signum == SIGINT) {  // a second Ctrl-C: stop now
    std::signal(SIGINT, SIG_DFL);
    std::raise(SIGINT);
  }
  g_stop_signal.store(signum);
}

// SIGTERM, SIGINT and SIGUSR1 ask the loop to stop at the next step boundary.
class StopSignals {
 public:
  StopSignals() {
    g_stop_signal.store(0);
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &sa, &previous_[i]);
  }
  ~StopSignals() {
    for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &previous_[i], nullptr);
  }

 private:
  static constexpr int kSignals[3] = {SIGTERM, SIGINT, SIGUSR1};
  struct sigaction previous_[3];
};

// Test hook: GPT2FT_FAULT_CRASH_AFTER_STEP=N ends the process abruptly after step N.
void maybe_crash_after(int64_t step) {
  static const char* env = std::getenv("GPT2FT_FAULT_CRASH_AFTER_STEP");
  if (env && step == std::atoll(env)) {
    std::fprintf(stderr, "fault injection: crashing after step %lld\n", static_cast<long long>(step));
    ::_exit(137);
  }
}

// The largest divisor of n that is at most `limit` (>= 1).
int64_t largest_divisor_at_most(int64_t n, int64_t limit) {
  int64_t d = std::max<int64_t>(1, limit);
  while (n % d != 0) --d;
  return d;
}

// The largest micro batch below `micro` (at most half of it, at least `minimum`) that divides
// the batch; 0 when there is none.
int64_t smaller_micro_batch(int64_t micro, int64_t batch, int64_t minimum) {
  if (micro / 2 < 1) return 0;
  const int64_t m = largest_divisor_at_most(batch, micro / 2);
  return m >= minimum ? m : 0;
}

std::vector<std::pair<c10::Device, torch::Tensor>> rng_states(c10::Device device) {
  std::vector<std::pair<c10::Device, torch::Tensor>> out = {{c10::kCPU, get_rng_state(c10::kCPU)}};
  if (device.is_cuda()) out.emplace_back(device, get_rng_state(device));
  return out;
}

void set_rng_states(const std::vector<std::pair<c10::Device, torch::Tensor>>& states) {
  for (const auto& [d, state] : states) set_rng_state(d, state);
}

}  // namespace

// The memory a training step may plan for: on CUDA the GPU's memory (or cuda.memory_limit)
// less 1 GiB for the CUDA context and libraries, and 5% for the caching allocator's
// rounding and fragmentation; on the CPU half the host's memory.
int64_t plannable_memory(const TrainConfig& cfg, c10::Device device) {
  if (!device.is_cuda()) return static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE) / 2;
  int64_t total = cuda_memory(device).total;
  if (!cfg.cuda.memory_limit.empty()) total = std::min(total, parse_memory_size(cfg.cuda.memory_limit, "cuda.memory_limit"));
  return static_cast<int64_t>(0.95 * static_cast<double>(total - (1ll << 30)));
}

// train.micro_batch_size "auto": the largest divisor of the global batch the planner fits in
// plannable_memory(). Back-off remains the safety net.
int64_t auto_micro_batch(const TrainConfig& cfg, c10::Device device, int64_t per_rank_batch, int64_t world_size) {
  const MemoryPlanInput input = memory_plan_input(cfg, world_size);
  const MemoryPlan plan = plan_memory(input);
  const int64_t budget = plannable_memory(cfg, device);
  const int64_t fits = std::min(plan.largest_micro_batch(budget), per_rank_batch);
  const int64_t micro = largest_divisor_at_most(per_rank_batch, fits);
  spdlog::info("train.micro_batch_size \"auto\": the planner predicts {:.2f} GiB fixed + {:.3f} GiB per sequence; "
               "{} fit in {:.1f} GiB; using micro batch {}",
               plan.fixed() / double(1ll << 30), plan.per_sequence() / double(1ll << 30), fits,
               budget / double(1ll << 30), micro);
  return micro;
}

namespace {

// Logs of a multi-rank run carry the rank; only rank 0 logs below warnings.
void configure_rank_logging(const LaunchEnv& env) {
  if (!env.distributed()) return;
  spdlog::set_pattern("[%H:%M:%S] [rank " + std::to_string(env.rank) + "] %^%l%$ %v");
  if (env.rank != 0) spdlog::set_level(spdlog::level::warn);
}

// Every rank's RNG states for a checkpoint, under rng_key_of_rank (rank 0's are saved as the
// checkpoint's own).
NamedTensors gather_rank_rng(Communicator& comm, c10::Device device) {
  NamedTensors out;
  if (!comm.distributed()) return out;
  for (const auto& [d, mine] : rng_states(device)) {
    const std::string type = d.is_cpu() ? "cpu" : "cuda";
    const std::vector<torch::Tensor> all = comm.all_gather_bytes(mine, "RNG states");
    for (int r = 1; r < comm.world_size(); ++r) out.emplace_back(rng_key_of_rank(r, type), all[r]);
  }
  return out;
}

}  // namespace

TrainSummary run_training(const TrainConfig& cfg) {
  const auto run_start = Clock::now();
  const LaunchEnv env = read_launch_env();
  configure_rank_logging(env);
  c10::Device device = parse_device(cfg.device, "device");
  if (env.distributed() && device.is_cuda()) {  // one process per GPU
    device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
    cuda_set_device(device);
  }
  if (device.is_cuda()) {
    configure_cuda(device, {cfg.cuda.tf32, cfg.cuda.expandable_segments,
                            cfg.cuda.memory_limit.empty() ? 0 : parse_memory_size(cfg.cuda.memory_limit, "cuda.memory_limit")});
  }
  Communicator comm(env, device, cfg.distributed.backend, cfg.distributed.timeout_s);
  const int64_t W = comm.world_size();
  const fs::path out_dir = cfg.output_dir;
  fs::create_directories(out_dir);
  const std::string resolved = cfg.to_json().dump(2);
  spdlog::info("resolved config:\n{}", resolved);
  if (comm.is_main()) write_file_atomic(out_dir / "config.json", resolved + "\n");
  StopSignals stop_signals;

  // Every rank builds the same model from the same seed; rank 0's copy is broadcast anyway.
  torch::manual_seed(static_cast<uint64_t>(cfg.train.seed));
  GPT2 model = build_model(cfg, device);
  const GPT2Config& mc = model->config();
  const int64_t T = cfg.data.seq_len;
  if (T > mc.n_positions) {
    throw Error("data.seq_len (" + std::to_string(T) + ") exceeds the model's n_positions (" +
                std::to_string(mc.n_positions) + ")");
  }

  // Batch arithmetic: global batch = micro batch (per rank) * accumulation * ranks, in sequences.
  int64_t micro = cfg.train.micro_batch_size;
  const int64_t accum_cfg = cfg.train.gradient_accumulation_steps > 0 ? cfg.train.gradient_accumulation_steps : 1;
  const int64_t global = cfg.train.global_batch_size > 0 ? cfg.train.global_batch_size : micro * accum_cfg * W;
  if (global % W != 0) {
    throw Error("train.global_batch_size (" + std::to_string(global) + ") is not divisible by the number of ranks (" +
                std::to_string(W) + "); choose a multiple of " + std::to_string(W));
  }
  const int64_t per_rank = global / W;
  if (cfg.micro_batch_auto()) micro = auto_micro_batch(cfg, device, per_rank, W);

  const c10::ScalarType amp = resolve_amp_dtype(cfg.amp.dtype, device);
  AdamWOptions ao;
  ao.weight_decay = cfg.train.weight_decay;
  ao.betas = cfg.train.betas;
  ao.eps = cfg.train.eps;
  ao.fused = cfg.train.fused_adamw == "on" || (cfg.train.fused_adamw == "auto" && device.is_cuda());
  std::vector<std::pair<std::string, torch::Tensor>> trained_named;
  std::vector<torch::Tensor> params;  // the trained parameters
  for (const auto& item : model->named_parameters()) {
    if (!item.value().requires_grad()) continue;
    trained_named.emplace_back(item.key(), item.value());
    params.push_back(item.value());
  }
  // ZeRO-1: this rank's AdamW holds only the parameters it owns.
  std::optional<OptimizerShards> shards;
  if (cfg.distributed.shard_optimizer && comm.distributed()) shards.emplace(comm, trained_named);
  AdamW optimizer(shards ? shards->owned() : trained_named, ao);
  std::optional<GradScaler> scaler;
  if (amp == c10::kHalf) {
    scaler.emplace(device, GradScalerOptions{cfg.amp.init_scale, cfg.amp.growth_factor, cfg.amp.backoff_factor,
                                             cfg.amp.growth_interval});
  }

  // Resume: the latest checkpoint of this run folder, a given one, or none. Every rank reads
  // it (the run folder is on a shared filesystem).
  TrainingState state;
  std::optional<fs::path> resume_from;
  if (cfg.checkpoint.resume == "auto") resume_from = latest_checkpoint(out_dir);
  else if (cfg.checkpoint.resume != "none") resume_from = fs::path(cfg.checkpoint.resume);
  if (resume_from) {
    state = load_checkpoint(*resume_from, model, optimizer, scaler ? &*scaler : nullptr, comm.rank(),
                            static_cast<int>(W));
    if (state.global_batch != global) {
      throw Error("checkpoint " + resume_from->string() + " was trained with a global batch of " +
                  std::to_string(state.global_batch) + " sequences but the config asks for " + std::to_string(global) +
                  "; resuming would change the effective batch. Set train.global_batch_size=" +
                  std::to_string(state.global_batch) + ", or checkpoint.resume=none to start over");
    }
    if (state.micro_batch_from_oom && state.micro_batch < micro) {
      spdlog::warn("using micro batch {} from the checkpoint (lowered after running out of memory) instead of the "
                   "config's {}; the global batch stays {}",
                   state.micro_batch, micro, global);
      micro = state.micro_batch;
    }
    if (state.world_size != W) {
      spdlog::info("the checkpoint was written by {} rank(s), this run has {}: same global batch {} and sample order, "
                   "accumulation recomputed",
                   state.world_size, W, global);
    }
    spdlog::info("resumed from {} at step {} (epoch {}, sample {} of the epoch)", resume_from->string(), state.step,
                 state.loader.epoch, state.loader.consumed);
  }
  if (per_rank % micro != 0) {
    if (!resume_from || cfg.train.global_batch_size == 0) {
      throw Error("train.global_batch_size (" + std::to_string(global) + ") is not divisible by the micro batch (" +
                  std::to_string(micro) + ")" + (W > 1 ? " times the number of ranks (" + std::to_string(W) + ")" : ""));
    }
    // Resumed on another number of ranks: the largest micro batch below that fits.
    const int64_t was = micro;
    micro = largest_divisor_at_most(per_rank, micro);
    spdlog::warn("micro batch {} does not divide the {} sequences per rank of {} ranks; using {}", was, per_rank, W,
                 micro);
  }
  int64_t accum = per_rank / micro;
  state.global_batch = global;
  state.world_size = W;

  // Identical start on every rank; dropout draws differ per rank (rank 0 continues the
  // single-process stream) unless the checkpoint restored each rank's own state.
  {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> tensors;
    for (const auto& p : model->parameters()) tensors.push_back(p);
    for (const auto& b : model->buffers()) tensors.push_back(b);
    comm.broadcast_(tensors, 0, "initial weights");
  }
  if (comm.rank() > 0 && (!resume_from || !state.rng_restored)) {
    torch::manual_seed(static_cast<uint64_t>(cfg.train.seed) + 7919ull * comm.rank() + 1000003ull * state.step);
  }

  LoaderOptions lo;
  lo.shards = expand_glob(cfg.data.train, "data.train");
  lo.seq_len = T;
  lo.micro_batch = micro;
  lo.seed = static_cast<uint64_t>(cfg.data.seed);
  lo.shuffle = cfg.data.shuffle;
  lo.num_workers = static_cast<int>(cfg.data.num_workers);
  lo.prefetch = 2 * lo.num_workers + 2;
  lo.rank = comm.rank();
  lo.world_size = static_cast<int>(W);
  lo.vocab_size = mc.vocab_size;
  lo.device = device;
  DataLoader loader(lo, state.loader);
  const std::vector<fs::path> val_shards = cfg.data.val.empty() ? std::vector<fs::path>{}
                                                                : expand_glob(cfg.data.val, "data.val");
  const int64_t max_steps = cfg.train.max_steps > 0
                                ? cfg.train.max_steps
                                : static_cast<int64_t>(std::ceil(cfg.train.epochs * loader.samples_per_epoch() / global));
  LrSchedule schedule{cfg.train.lr_schedule, cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps, max_steps};

  GradReducer reducer(comm, params, static_cast<int64_t>(cfg.distributed.bucket_mb * (1 << 20)));

  const double flops_per_token = model_flops_per_token(mc, T);
  const double peak_flops = device.is_cuda() ? gpu_peak_flops(cuda_device_name(device)) * static_cast<double>(W) : 0.0;
  int64_t trained = 0;
  for (const auto& p : params) trained += p.numel();
  spdlog::info("model: {} parameters ({} trained); device {}{}; micro batch {} x accumulation {}{} = global batch {} "
               "sequences of {} tokens; {} steps ({:.2f} epochs of {} samples); amp {}{}; fused AdamW {}",
               mc.num_parameters(), trained, device.str(), device.is_cuda() ? " (" + cuda_device_name(device) + ")" : "",
               micro, accum, W > 1 ? fmt::format(" x {} ranks", W) : "", global, T, max_steps,
               static_cast<double>(max_steps * global) / loader.samples_per_epoch(), loader.samples_per_epoch(),
               amp == c10::kBFloat16 ? "bfloat16" : amp == c10::kHalf ? "float16" : "none",
               cfg.amp.dtype == "auto" ? " (auto)" : "", ao.fused ? "on" : "off");
  if (W > 1) {
    spdlog::info("gradients: {} bucket(s), {:.1f} MiB, all-reduced during the backward of the last micro batch",
                 reducer.num_buckets(), reducer.bucket_bytes_total() / double(1 << 20));
  }

  MetricsLog metrics(out_dir / "metrics.jsonl", cfg.log.progress, max_steps, comm.is_main());
  EvalOptions eval_options{T, cfg.eval.batch_size > 0 ? cfg.eval.batch_size : micro, cfg.eval.max_batches, 0, amp,
                           &comm};
  auto validate = [&](int64_t step) -> std::optional<double> {
    if (val_shards.empty()) return std::nullopt;
    const EvalResult r = evaluate(model, val_shards, eval_options, device);
    eval_options.max_forward_batch = r.forward_batch;  // keep what fitted for the next evaluation
    model->train();
    metrics.record({{"step", step}, {"val_loss", r.loss}, {"val_perplexity", r.perplexity}, {"val_tokens", r.tokens}});
    return r.loss;
  };
  // Collective: every rank hands in its RNG state, rank 0 writes, all wait until it is on disk.
  auto checkpoint = [&] {
    state.micro_batch = micro;
    state.loader = loader.state();
    const NamedTensors rank_rng = gather_rank_rng(comm, device);
    const NamedTensors optimizer_state = shards ? shards->gather_state(optimizer) : adamw_state(optimizer);
    if (comm.is_main()) {
      save_checkpoint(out_dir, state, model, optimizer_state, scaler ? &*scaler : nullptr, cfg,
                      cfg.checkpoint.keep_last, rank_rng);
    }
    comm.barrier("checkpoint of step " + std::to_string(state.step));
    return checkpoint_folder(out_dir, state.step);
  };

  TrainSummary summary;
  auto interval_start = Clock::now();
  int64_t interval_steps = 0;
  bool logged_first = false;
  const int64_t first_step = state.step;
  for (int64_t step = first_step; step < max_steps; ++step) {
    const double lr = schedule.at(step);
    torch::Tensor loss_sum;
    std::vector<int64_t> agreed;  // over all ranks: {out of memory, stop signal, out of time}
    for (;;) {  // one optimizer step; repeated from its first sample after an out-of-memory back-off
      const LoaderState step_start = loader.state();
      const auto rng_at_start = rng_states(device);
      std::string oom_message;
      try {
        // Forward and backward over the micro batches; each loss is a mean over its micro
        // batch divided by the accumulation, so the gradients sum to this rank's mean. The
        // last backward also averages them over the ranks, bucket by bucket.
        loss_sum = torch::zeros({}, torch::TensorOptions().device(device));
        for (int64_t m = 0; m < accum; ++m) {
          Batch batch = loader.next();
          torch::Tensor loss;
          {
            AutocastGuard autocast(device.type(), amp);
            maybe_inject_oom(micro);
            loss = (cfg.train.chunked_loss ? model->forward_loss(batch.x, batch.y)
                                           : next_token_loss(model->forward(batch.x), batch.y)) /
                   static_cast<double>(accum);
          }
          loss_sum += loss.detach();
          if (m == accum - 1) reducer.arm();
          (scaler ? scaler->scale(loss) : loss).backward();
        }
      } catch (const std::exception& e) {
        if (!is_out_of_memory(e)) throw;
        oom_message = describe_exception(e);
        clear_gradients(params);  // drop this step's partial gradients; nothing was applied
      }
      reducer.finish();  // every rank issues the same collectives, even after an error
      const bool out_of_time = cfg.train.time_limit > 0 &&
                               std::chrono::duration<double>(Clock::now() - run_start).count() > cfg.train.time_limit;
      agreed = comm.agree_max({oom_message.empty() ? 0 : 1, g_stop_signal.load(), out_of_time ? 1 : 0},
                              "the step's outcome");
      if (agreed[0] == 0) break;

      // Some rank ran out of memory: every rank drops the step and changes micro batch together.
      if (oom_message.empty()) oom_message = "another rank ran out of memory";
      clear_gradients(params);
      loss_sum = torch::Tensor();
      release_cached_memory(device);
      const int64_t smaller = smaller_micro_batch(micro, per_rank, cfg.oom.min_micro_batch_size);
      if (cfg.oom.policy == "fail") {
        throw Error("out of memory at micro batch " + std::to_string(micro) + " (step " + std::to_string(step + 1) +
                    "): " + oom_message + ". Lower train.micro_batch_size or set oom.policy \"backoff\"");
      }
      if (cfg.oom.policy == "checkpoint_and_exit" || smaller == 0) {
        loader.restart(step_start, micro);
        set_rng_states(rng_at_start);
        state.micro_batch_from_oom = true;
        const int64_t next = smaller ? smaller : micro;
        micro = next;
        const fs::path saved = checkpoint();
        throw ExitRequest(kExitOomRestart,
                          "out of memory at step " + std::to_string(step + 1) + " with micro batch " +
                              std::to_string(loader.micro_batch()) + "; saved " + saved.string() + " (step " +
                              std::to_string(step) + "). " +
                              (smaller ? "Run again with checkpoint.resume \"auto\": it continues with micro batch " +
                                             std::to_string(next) + " and the same global batch " + std::to_string(global)
                                       : "The micro batch cannot go lower (oom.min_micro_batch_size " +
                                             std::to_string(cfg.oom.min_micro_batch_size) +
                                             "); enable model.activation_checkpointing, amp.dtype, or a shorter "
                                             "data.seq_len, then run again"));
      }
      spdlog::warn("OUT OF MEMORY at step {} with micro batch {} ({}): backing off to micro batch {} x accumulation {}{} "
                   "(global batch {} unchanged) and redoing the step from its first sample",
                   step + 1, micro, oom_message, smaller, per_rank / smaller, W > 1 ? fmt::format(" x {} ranks", W) : "",
                   global);
      micro = smaller;
      accum = per_rank / micro;
      state.micro_batch_from_oom = true;
      if (cfg.eval.batch_size == 0) eval_options.batch_size = micro;
      loader.restart(step_start, micro);
      set_rng_states(rng_at_start);
    }

    // Unscale, clip, step (skipped on inf/NaN under float16), update the scale.
    const std::vector<torch::Tensor> grads = gradients_of(params);
    if (scaler) {
      scaler->unscale_(grads);
      comm.all_reduce_max_(scaler->found_inf(), "found_inf");  // every rank skips the same steps
    }
    const torch::Tensor grad_norm = clip_grad_norm(grads, cfg.train.grad_clip);
    if (!scaler) optimizer.step(lr);
    else if (ao.fused) optimizer.step(lr, std::nullopt, scaler->found_inf());
    else if (scaler->found_inf().item<float>() == 0.0f) optimizer.step(lr);  // unfused: one sync
    if (scaler) scaler->update();
    if (shards) shards->broadcast_updated_weights();
    clear_gradients(params);
    ++interval_steps;
    state.step = step + 1;

    // Metrics only at log steps: the only host syncs of the loop.
    const bool last = step + 1 == max_steps;
    if ((step + 1) % cfg.log.every_steps == 0 || last || step == first_step) {
      comm.all_reduce_sum_(loss_sum, "training loss");
      const double loss_value = loss_sum.item<double>() / static_cast<double>(W);
      const double secs = std::chrono::duration<double>(Clock::now() - interval_start).count();
      const double tokens_per_s = static_cast<double>(interval_steps * global * T) / secs;
      nlohmann::json row = {{"step", step + 1},
                            {"loss", loss_value},
                            {"lr", lr},
                            {"grad_norm", grad_norm.item<double>()},
                            {"tokens_per_s", tokens_per_s},
                            {"step_ms", 1000 * secs / interval_steps},
                            {"epoch", loader.state().epoch},
                            {"samples_in_epoch", loader.state().consumed},
                            {"micro_batch", micro}};
      if (W > 1) row["world_size"] = W;
      if (peak_flops > 0) row["mfu"] = flops_per_token * tokens_per_s / peak_flops;
      if (device.is_cuda()) {
        const CudaMemory mem = cuda_memory(device);
        row["cuda_peak_allocated_gb"] = mem.peak_allocated / 1e9;
        row["cuda_peak_reserved_gb"] = mem.peak_reserved / 1e9;
      }
      if (scaler) {
        row["loss_scale"] = scaler->scale_tensor().item<double>();
        row["skipped_steps"] = static_cast<int64_t>(scaler->skipped_steps().item<double>());
      }
      metrics.record(row);
      if (!logged_first) summary.first_loss = loss_value, logged_first = true;
      summary.last_loss = loss_value;
      interval_start = Clock::now();
      interval_steps = 0;
    } else {
      metrics.progress(step + 1);
    }
    if (cfg.eval.every_steps > 0 && (step + 1) % cfg.eval.every_steps == 0 && !last) validate(step + 1);
    if (cfg.checkpoint.every_steps > 0 && (step + 1) % cfg.checkpoint.every_steps == 0 && !last) checkpoint();
    maybe_crash_after(step + 1);

    // A stop request (a signal or the time limit, on any rank) ends the run at this step
    // boundary, resumably, on every rank.
    const int signum = static_cast<int>(agreed[1]);
    if ((signum != 0 || agreed[2] != 0) && !last) {
      metrics.clear_bar();
      const fs::path saved = checkpoint();
      const std::string why = signum ? std::string("signal ") + strsignal(signum)
                                     : "train.time_limit of " + std::to_string(cfg.train.time_limit) + "s";
      throw ExitRequest(kExitStopped, "stopped by " + why + " after step " + std::to_string(step + 1) + "; saved " +
                                          saved.string() + ". Run again with checkpoint.resume \"auto\" to continue");
    }
  }
  metrics.clear_bar();
  summary.steps = state.step;
  summary.micro_batch = micro;
  summary.accumulation = accum;
  if (state.step >= max_steps && !logged_first) spdlog::info("the run is already complete ({} steps)", max_steps);
  summary.val_loss = validate(summary.steps);
  if (cfg.checkpoint.at_end) checkpoint();

  summary.final_model = out_dir / "final";
  if (comm.is_main()) {
    SaveModelOptions save;
    save.dtype = cfg.save_dtype == "bfloat16" ? c10::kBFloat16 : cfg.save_dtype == "float16" ? c10::kHalf : c10::kFloat;
    if (!cfg.model.init_from.empty()) save.tokenizer_from = fs::path(cfg.model.init_from);
    save_model_folder(model, summary.final_model, save);
  }
  comm.barrier("final model");
  summary.seconds = std::chrono::duration<double>(Clock::now() - run_start).count();
  spdlog::info("done: {} steps in {:.1f}s; train loss {:.4f} -> {:.4f}{}; model saved to {}", summary.steps,
               summary.seconds, summary.first_loss, summary.last_loss,
               summary.val_loss ? fmt::format("; val loss {:.4f}", *summary.val_loss) : "", summary.final_model.string());
  return summary;
}

}  // namespace gpt2ft
