// Training config: declaration of every option, and the visitors that parse, print and
// document them.
#include "gpt2ft/train/config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/memory/planner.h"
#include "gpt2ft/model/config.h"
#include "gpt2ft/model/lora.h"

namespace gpt2ft {
using nlohmann::json;

constexpr int64_t kMaxInt = std::numeric_limits<int64_t>::max();
// Bounds that no real run comes near and that keep every product the trainer forms finite.
constexpr int64_t kMaxMicroBatch = 1 << 16;   // sequences per forward pass
constexpr int64_t kMaxBatch = 1 << 24;        // sequences per optimizer step, micro batches per step
constexpr int64_t kMaxSteps = 1ll << 40;
constexpr double kInf = std::numeric_limits<double>::infinity();

template <class Visitor>
void TrainConfig::visit(Visitor& v) {
  // model
  v.text(model.init_from, "model.init_from", "",
         "Hugging Face model folder to fine-tune (config.json + model.safetensors [+ tokenizer files])");
  v.choice(model.preset, "model.preset", "", {"", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"},
           "Train a randomly initialised model of this shape instead of model.init_from");
  v.number(model.dropout, "model.dropout", -1.0, -1.0, 0.99,
           "Dropout for embeddings, attention and residuals; -1 keeps the model's config.json values");
  v.checkpointing(model.activation_checkpointing, "model.activation_checkpointing", "none",
                  "Recompute activations in backward to save memory: \"none\", \"all\", N (every N-th block), or "
                  "\"auto\" (the least recomputation the planner fits the micro batch with)");
  v.flag(model.freeze_embeddings, "model.freeze_embeddings", false, "Do not train wte/wpe (and a tied lm_head)");
  v.integer(model.freeze_blocks, "model.freeze_blocks", 0, 0, GPT2Config::kMaxLayers,
            "Do not train the first N transformer blocks");
  v.integer(model.resize_vocab, "model.resize_vocab", 0, 0, GPT2Config::kMaxVocab,
            "Resize the vocabulary to N (new rows start at the mean embedding); 0 keeps it");
  v.integer(model.lora.rank, "model.lora.rank", 0, 0, LoraConfig::kMaxRank,
            "LoRA rank r: train low-rank adapters on a frozen base (as PEFT); 0 = full fine-tuning");
  v.number(model.lora.alpha, "model.lora.alpha", 8.0, 0.0, 1e4, "LoRA alpha: the adapters are scaled by alpha / rank");
  v.number(model.lora.dropout, "model.lora.dropout", 0.0, 0.0, 0.99, "Dropout on the adapters' input");
  v.strings(model.lora.targets, "model.lora.targets", {"c_attn"},
            "Modules that get adapters, matched as PEFT's target_modules: c_attn, c_proj (attention and MLP), c_fc");
  v.text(model.lora.init_from, "model.lora.init_from", "",
         "A PEFT LoRA adapter folder to continue training (its r, alpha and targets are used)");
  v.choice(model.lora.base_dtype, "model.lora.base_dtype", "float32", {"float32", "bfloat16", "float16"},
           "dtype of the frozen base weights under LoRA (16 bits halve them; needs amp.dtype to match)");
  // data
  v.text(data.train, "data.train", "", "Glob of training shards (required), e.g. \"data/train_*.bin\"");
  v.text(data.val, "data.val", "", "Glob of validation shards; empty: no validation");
  v.integer(data.seq_len, "data.seq_len", 1024, 1, GPT2Config::kMaxPositions,
            "Tokens per sample (T); at most the model's n_positions");
  v.integer(data.num_workers, "data.num_workers", 2, 1, 256, "Loader worker threads");
  v.integer(data.seed, "data.seed", 1337, 0, kMaxInt, "Seed of the per-epoch sample order");
  v.flag(data.shuffle, "data.shuffle", true, "Shuffle samples each epoch (false: shard order)");
  v.choice(data.packing, "data.packing", "auto", {"auto", "documents", "concat"},
           "Samples of document shards (prompt/completion data): \"documents\" packs whole documents into rows, "
           "each attending only to itself; \"concat\" cuts one stream into windows. \"auto\": documents for "
           "document shards, concat for plain text");
  v.choice(data.too_long, "data.too_long", "truncate", {"truncate", "error"},
           "A packed document longer than data.seq_len + 1 tokens: cut to its start (counted in the log), or an error. "
           "A preference pair: its prompt's beginning first, then its continuations' ends");
  v.choice(attention.packed, "attention.packed", "mask", {"mask", "varlen"},
           "How packed documents attend on the GPU: \"mask\" (a block-diagonal mask, every device; cuDNN attention "
           "is off for that call), or \"varlen\" (variable-length flash attention: no T x T mask, CUDA under "
           "bfloat16/float16 autocast only, the mask elsewhere)");
  // train
  v.micro_batch(train.micro_batch_size, "train.micro_batch_size", 8,
                "Sequences per forward/backward pass on each rank, or \"auto\" (the memory planner picks)");
  v.integer(train.gradient_accumulation_steps, "train.gradient_accumulation_steps", 0, 0, kMaxBatch,
            "Micro batches per optimizer step; 0 derives it from train.global_batch_size (else 1)");
  v.integer(train.global_batch_size, "train.global_batch_size", 0, 0, kMaxBatch,
            "Sequences per optimizer step over all ranks; divisible by micro batch * ranks. 0: micro * accumulation * ranks");
  v.integer(train.max_steps, "train.max_steps", 0, 0, kMaxSteps, "Optimizer steps to run (or set train.epochs)");
  v.number(train.epochs, "train.epochs", 0.0, 0.0, 1e6, "Epochs to run when train.max_steps is 0");
  v.number(train.lr, "train.lr", 3e-4, 0.0, 10.0, "Peak learning rate");
  v.choice(train.lr_schedule, "train.lr_schedule", "cosine", {"constant", "linear", "cosine"},
           "Decay after warmup: constant, linear or cosine down to train.min_lr");
  v.integer(train.warmup_steps, "train.warmup_steps", 0, 0, kMaxSteps, "Linear warmup steps from 0 to train.lr");
  v.number(train.min_lr, "train.min_lr", 0.0, 0.0, 10.0, "Learning rate at the end of the decay");
  v.number(train.weight_decay, "train.weight_decay", 0.1, 0.0, 10.0,
           "AdamW weight decay (not applied to biases and LayerNorm weights)");
  // Below 1: AdamW divides by 1 - beta^t.
  v.pair(train.betas, "train.betas", {0.9, 0.95}, 0.0, 0.999999, "AdamW betas [beta1, beta2], each below 1");
  v.number(train.eps, "train.eps", 1e-8, 1e-30, 1.0, "AdamW epsilon (above 0: AdamW divides by sqrt(v) + eps)");
  v.number(train.grad_clip, "train.grad_clip", 1.0, 0.0, 1e6, "Clip the global gradient norm to this; 0 = off");
  v.choice(train.optimizer, "train.optimizer", "adamw", {"adamw", "adamw_8bit"},
           "\"adamw\", or \"adamw_8bit\": the moments of tensors of 4096+ values in 8-bit blocks (torchao's "
           "AdamW8bit), 2 bytes a parameter instead of 8");
  v.choice(train.adamw_8bit_embeddings, "train.adamw_8bit.embeddings", "float32", {"float32", "8bit"},
           "train.optimizer \"adamw_8bit\": the moments of wte, wpe (and an untied lm_head) in float32 (as "
           "bitsandbytes' stable embedding), or in 8-bit blocks like every other large tensor (torchao's rule)");
  v.choice(train.fused_adamw, "train.fused_adamw", "auto", {"auto", "on", "off"},
           "Use the fused AdamW kernel (auto: on CUDA; train.optimizer \"adamw\" only)");
  v.flag(train.chunked_loss, "train.chunked_loss", true,
         "Compute lm_head + cross-entropy in chunks, never holding the micro batch's logits (false: eager)");
  v.choice(train.objective, "train.objective", "auto", {"auto", "dpo"},
           "What a step minimises: \"auto\", the data's own loss (next tokens of plain text, the targets of "
           "document shards); \"dpo\", direct preference optimisation on preference shards (dpo.*)");
  v.number(dpo.beta, "dpo.beta", 0.1, 1e-6, 1e6, "DPO's beta: how far the policy may move from the reference");
  v.choice(dpo.loss, "dpo.loss", "sigmoid", {"sigmoid", "ipo", "hinge"},
           "The preference loss, as TRL's loss_type: \"sigmoid\" (DPO), \"ipo\" (on per-token mean log-probs) "
           "or \"hinge\"");
  v.number(dpo.label_smoothing, "dpo.label_smoothing", 0.0, 0.0, 0.4999,
           "\"sigmoid\": conservative DPO's epsilon, the assumed share of flipped labels");
  v.choice(dpo.reference, "dpo.reference", "precomputed", {"precomputed", "base", "model"},
           "The reference's log-probs: \"precomputed\" once before training by the initial model and kept beside "
           "the run; \"base\" (LoRA) the base with its adapters off, on the fly; \"model\" a frozen copy (16-bit "
           "under 16-bit autocast)");
  v.flag(train.deterministic, "train.deterministic", false,
         "Two runs of this config give the same bits on machines of one kind: MKL's reproducible branch on the "
         "CPU (about 1.4x a CPU step), deterministic kernels on CUDA. A resume is exact without it");
  v.choice(train.optimizer_offload, "train.optimizer_offload", "none", {"none", "cpu"},
           "cpu: AdamW's state and step on the host (8 bytes a parameter less on the GPU, 16 more on the host)");
  v.integer(train.seed, "train.seed", 1337, 0, kMaxInt, "Seed of initialisation and dropout");
  v.number(train.time_limit, "train.time_limit", 0.0, 0.0, kInf,
           "Wall seconds after which the run checkpoints and stops; 0 = none");
  // amp
  v.choice(amp.dtype, "amp.dtype", "auto", {"auto", "none", "bfloat16", "float16"},
           "Autocast dtype; auto: bfloat16 on GPUs that have it, float16 on older GPUs, none on the CPU. "
           "float16 uses a dynamic loss scale (GradScaler)");
  v.number(amp.init_scale, "amp.init_scale", 65536.0, 1e-30, 1e30, "float16: initial loss scale");
  v.number(amp.growth_factor, "amp.growth_factor", 2.0, 1.0, 1e3, "float16: scale growth factor");
  v.number(amp.backoff_factor, "amp.backoff_factor", 0.5, 1e-30, 1.0, "float16: scale backoff factor on inf/NaN");
  v.integer(amp.growth_interval, "amp.growth_interval", 2000, 1, kMaxInt,
            "float16: steps without inf/NaN before the scale grows");
  // checkpoint
  v.integer(checkpoint.every_steps, "checkpoint.every_steps", 0, 0, kMaxInt,
            "Write a training checkpoint every N steps; 0 = only at the end");
  v.integer(checkpoint.keep_last, "checkpoint.keep_last", 2, 1, kMaxInt, "Checkpoints kept");
  v.flag(checkpoint.keep_best, "checkpoint.keep_best", false,
         "Keep <output_dir>/best: the model (or adapter) with the lowest validation loss so far, never pruned");
  v.flag(checkpoint.at_end, "checkpoint.at_end", true,
         "Write a training checkpoint when the run completes (benchmarks turn it off; final/ is written anyway)");
  v.text(checkpoint.resume, "checkpoint.resume", "auto",
         "\"auto\" (the latest checkpoint in output_dir, if any, of this same run: a checkpoint of another model, "
         "data or settings is refused), \"continue\" (the latest even if those changed), \"none\", or a "
         "checkpoint folder");
  // eval
  v.integer(eval.every_steps, "eval.every_steps", 0, 0, kMaxInt, "Validation every N steps; 0 = only at the end");
  v.number(eval.every_epochs, "eval.every_epochs", 0.0, 0.0, 1e6,
           "Validation also each time this many epochs (fractions allowed) have been trained; 0 = off");
  v.integer(eval.early_stopping_patience, "eval.early_stopping_patience", 0, 0, kMaxInt,
            "Stop (a completed run) after N validations without an improvement of eval.early_stopping_min_delta; "
            "0 = off");
  v.number(eval.early_stopping_min_delta, "eval.early_stopping_min_delta", 0.0, 0.0, 1e6,
           "The least decrease of the validation loss below the best so far that counts as an improvement");
  v.integer(eval.max_sequences, "eval.max_sequences", 0, 0, kMaxInt,
            "Validation windows (of data.seq_len + 1 tokens) per evaluation, the first ones of data.val; 0 = all. "
            "The same set whatever the micro batch, eval batch or number of ranks");
  v.integer(eval.batch_size, "eval.batch_size", 0, 0, kMaxMicroBatch,
            "Sequences per validation forward pass; 0: the training micro batch. Halved on out-of-memory");
  // log
  v.integer(log.every_steps, "log.every_steps", 10, 1, kMaxInt,
            "Metrics every N steps (console and metrics.jsonl); the loss is the mean over those steps");
  v.flag(log.tensorboard, "log.tensorboard", true,
         "Write TensorBoard event files under <output_dir>/tensorboard (rank 0)");
  v.choice(log.progress, "log.progress", "auto", {"auto", "bar", "lines"},
           "Progress bar on a terminal (auto), always, or plain log lines");
  // oom
  v.choice(oom.policy, "oom.policy", "backoff", {"backoff", "checkpoint_and_exit", "fail"},
           "On CUDA out-of-memory: halve the micro batch and redo the step, checkpoint and exit, or fail");
  v.integer(oom.min_micro_batch_size, "oom.min_micro_batch_size", 1, 1, kMaxInt, "Smallest micro batch back-off tries");
  // distributed (used when launched by torchrun or srun with several ranks)
  v.choice(distributed.backend, "distributed.backend", "auto", {"auto", "nccl", "gloo"},
           "c10d backend for gradients: auto = NCCL on CUDA, Gloo on the CPU");
  v.number(distributed.timeout_s, "distributed.timeout_s", 600.0, 1.0, 1e7,
           "Seconds a rendezvous or collective may wait for the other ranks before all ranks stop with an error");
  v.number(distributed.bucket_mb, "distributed.bucket_mb", 25.0, 0.001, 1e5,
           "Gradient bucket size in MiB: buckets are all-reduced as backward finishes them");
  v.flag(distributed.shard_optimizer, "distributed.shard_optimizer", false,
         "ZeRO-1: each rank keeps and updates the AdamW state of ~1/N of the parameters, then broadcasts them");
  // cuda
  v.flag(cuda.tf32, "cuda.tf32", true, "Let float32 matmuls use TF32 tensor cores on CUDA (what autocast leaves in float32)");
  v.flag(cuda.expandable_segments, "cuda.expandable_segments", true,
         "Expandable segments in the CUDA caching allocator: less fragmentation, fewer false out-of-memory back-offs");
  v.text(cuda.memory_limit, "cuda.memory_limit", "",
         "Cap the caching allocator at this size, e.g. \"24GiB\" (share a GPU, rehearse a smaller one); empty: no cap");
  v.text(cpu.memory_limit, "cpu.memory_limit", "",
         "On the CPU: refuse tensor allocations past this size, e.g. \"2GiB\", with the out-of-memory error CUDA "
         "throws, so that the back-off, exit 75/77 and the planner are rehearsed without a GPU; empty: no limit");
  // run
  v.text(output_dir, "output_dir", "runs/run", "Run folder: config, metrics.jsonl, checkpoints, final/ model");
  v.text(device, "device", "auto", "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"");
  v.choice(save_dtype, "save_dtype", "float32", {"float32", "bfloat16", "float16"}, "dtype of saved model weights");
}

namespace {

// A value as the user wrote it, shortened for an error message.
std::string show(const json& v) {
  std::string text = v.is_string() ? "\"" + v.get<std::string>() + "\"" : v.dump();
  if (text.size() > 120) text = text.substr(0, 100) + "... (" + std::to_string(text.size()) + " characters)";
  return text;
}

// A bound as written in an error message: whole numbers without an exponent.
std::string bound_text(double v) {
  if (v == std::floor(v) && std::abs(v) < 1e18) return std::to_string(static_cast<int64_t>(v));
  std::ostringstream s;
  s << v;
  return s.str();
}

std::string range_text(double lo, double hi) {
  if (hi == kInf || hi >= static_cast<double>(kMaxInt)) return ">= " + bound_text(lo);
  return "in [" + bound_text(lo) + ", " + bound_text(hi) + "]";
}

// Flattens nested objects into "a.b" -> value. An object at an option's own path is that
// option's value (and a wrong type for it), not a section.
void flatten(const json& j, const std::string& prefix, const std::set<std::string>& options,
             std::map<std::string, json>& out) {
  for (const auto& [key, value] : j.items()) {
    const std::string path = prefix.empty() ? key : prefix + "." + key;
    if (value.is_object() && !options.count(path)) flatten(value, path, options, out);
    else out[path] = value;
  }
}

// The JSON path of every option.
struct PathsVisitor {
  std::set<std::string> paths;
  void integer(int64_t&, const char* p, int64_t, int64_t, int64_t, const char*) { paths.insert(p); }
  void number(double&, const char* p, double, double, double, const char*) { paths.insert(p); }
  void flag(bool&, const char* p, bool, const char*) { paths.insert(p); }
  void text(std::string&, const char* p, const char*, const char*) { paths.insert(p); }
  void choice(std::string&, const char* p, const char*, std::initializer_list<const char*>, const char*) {
    paths.insert(p);
  }
  void pair(std::array<double, 2>&, const char* p, std::array<double, 2>, double, double, const char*) {
    paths.insert(p);
  }
  void strings(std::vector<std::string>&, const char* p, std::vector<std::string>, const char*) { paths.insert(p); }
  void micro_batch(int64_t&, const char* p, int64_t, const char*) { paths.insert(p); }
  void checkpointing(std::string&, const char* p, const char*, const char*) { paths.insert(p); }
};

struct DefaultsVisitor {
  void integer(int64_t& f, const char*, int64_t d, int64_t, int64_t, const char*) { f = d; }
  void number(double& f, const char*, double d, double, double, const char*) { f = d; }
  void flag(bool& f, const char*, bool d, const char*) { f = d; }
  void text(std::string& f, const char*, const char* d, const char*) { f = d; }
  void choice(std::string& f, const char*, const char* d, std::initializer_list<const char*>, const char*) { f = d; }
  void pair(std::array<double, 2>& f, const char*, std::array<double, 2> d, double, double, const char*) { f = d; }
  void strings(std::vector<std::string>& f, const char*, std::vector<std::string> d, const char*) { f = d; }
  void micro_batch(int64_t& f, const char*, int64_t d, const char*) { f = d; }
  void checkpointing(std::string& f, const char*, const char* d, const char*) { f = d; }
};

struct ParseVisitor {
  std::map<std::string, json>& values;
  std::string where;

  const json* find(const char* path) {
    const auto it = values.find(path);
    if (it == values.end()) return nullptr;
    return &it->second;
  }
  [[noreturn]] void fail(const char* path, const std::string& expected, const json& got) {
    throw Error(where + ": " + path + ": expected " + expected + ", got " + show(got));
  }
  void done(const char* path) { values.erase(path); }

  void integer(int64_t& f, const char* path, int64_t, int64_t lo, int64_t hi, const char*) {
    if (const json* v = find(path)) {
      const std::string expected = "an integer " + range_text(static_cast<double>(lo), static_cast<double>(hi));
      if (!v->is_number_integer()) fail(path, expected, *v);
      const int64_t x = v->get<int64_t>();
      if (x < lo || x > hi) fail(path, expected, *v);
      f = x;
      done(path);
    }
  }
  void number(double& f, const char* path, double, double lo, double hi, const char*) {
    if (const json* v = find(path)) {
      const std::string expected = "a number " + range_text(lo, hi);
      if (!v->is_number()) fail(path, expected, *v);
      const double x = v->get<double>();
      if (!(x >= lo && x <= hi)) fail(path, expected, *v);
      f = x;
      done(path);
    }
  }
  void flag(bool& f, const char* path, bool, const char*) {
    if (const json* v = find(path)) {
      if (!v->is_boolean()) fail(path, "true or false", *v);
      f = v->get<bool>();
      done(path);
    }
  }
  void text(std::string& f, const char* path, const char*, const char*) {
    if (const json* v = find(path)) {
      if (!v->is_string()) fail(path, "a string", *v);
      // A NUL ends a path at the system call: "out\u0000x" would write to "out".
      if (v->get<std::string>().find('\0') != std::string::npos) fail(path, "a string without NUL characters", *v);
      f = v->get<std::string>();
      done(path);
    }
  }
  void choice(std::string& f, const char* path, const char*, std::initializer_list<const char*> choices, const char*) {
    if (const json* v = find(path)) {
      std::string expected = "one of";
      bool ok = false;
      for (const char* c : choices) {
        expected += std::string(" \"") + c + "\"";
        ok = ok || (v->is_string() && v->get<std::string>() == c);
      }
      if (!ok) fail(path, expected, *v);
      f = v->get<std::string>();
      done(path);
    }
  }
  void pair(std::array<double, 2>& f, const char* path, std::array<double, 2>, double lo, double hi, const char*) {
    if (const json* v = find(path)) {
      const std::string expected = "two numbers " + range_text(lo, hi);
      if (!v->is_array() || v->size() != 2 || !(*v)[0].is_number() || !(*v)[1].is_number()) fail(path, expected, *v);
      for (int i = 0; i < 2; ++i) {
        const double x = (*v)[i].get<double>();
        if (!(x >= lo && x <= hi)) fail(path, expected, *v);
        f[i] = x;
      }
      done(path);
    }
  }
  void strings(std::vector<std::string>& f, const char* path, std::vector<std::string>, const char*) {
    if (const json* v = find(path)) {
      const std::string expected = "a list of non-empty strings";
      if (!v->is_array() || v->empty()) fail(path, expected, *v);
      f.clear();
      for (const auto& x : *v) {
        if (!x.is_string() || x.get<std::string>().empty()) fail(path, expected, *v);
        f.push_back(x.get<std::string>());
      }
      done(path);
    }
  }
  void micro_batch(int64_t& f, const char* path, int64_t, const char*) {
    if (const json* v = find(path)) {
      if (v->is_string() && v->get<std::string>() == "auto") f = 0;
      else if (v->is_number_integer() && v->get<int64_t>() >= 1 && v->get<int64_t>() <= kMaxMicroBatch)
        f = v->get<int64_t>();
      else fail(path, "an integer in [1, " + std::to_string(kMaxMicroBatch) + "] or \"auto\"", *v);
      done(path);
    }
  }
  void checkpointing(std::string& f, const char* path, const char*, const char*) {
    if (const json* v = find(path)) {
      if (v->is_string() && (v->get<std::string>() == "none" || v->get<std::string>() == "all" ||
                               v->get<std::string>() == "auto")) f = v->get<std::string>();
      else if (v->is_number_integer() && v->get<int64_t>() >= 1 && v->get<int64_t>() <= GPT2Config::kMaxLayers)
        f = std::to_string(v->get<int64_t>());
      else fail(path, "\"none\", \"all\", \"auto\" or an integer N >= 1 (every N-th block)", *v);
      done(path);
    }
  }
};

struct PrintVisitor {
  json out = json::object();
  void put(const char* path, const json& value) {
    json* node = &out;
    std::string p = path;
    size_t dot;
    while ((dot = p.find('.')) != std::string::npos) {
      node = &(*node)[p.substr(0, dot)];
      p = p.substr(dot + 1);
    }
    (*node)[p] = value;
  }
  void integer(int64_t& f, const char* path, int64_t, int64_t, int64_t, const char*) { put(path, f); }
  void number(double& f, const char* path, double, double, double, const char*) { put(path, f); }
  void flag(bool& f, const char* path, bool, const char*) { put(path, f); }
  void text(std::string& f, const char* path, const char*, const char*) { put(path, f); }
  void choice(std::string& f, const char* path, const char*, std::initializer_list<const char*>, const char*) { put(path, f); }
  void pair(std::array<double, 2>& f, const char* path, std::array<double, 2>, double, double, const char*) {
    put(path, json::array({f[0], f[1]}));
  }
  void strings(std::vector<std::string>& f, const char* path, std::vector<std::string>, const char*) { put(path, f); }
  void micro_batch(int64_t& f, const char* path, int64_t, const char*) { put(path, f == 0 ? json("auto") : json(f)); }
  void checkpointing(std::string& f, const char* path, const char*, const char*) {
    put(path, (f == "none" || f == "all" || f == "auto") ? json(f) : json(std::stoll(f)));
  }
};

struct HelpVisitor {
  std::ostringstream out;
  void line(const char* path, const json& def, const char* help) {
    out << "  " << path << " (default " << show(def) << ")\n      " << help << "\n";
  }
  void integer(int64_t&, const char* path, int64_t d, int64_t, int64_t, const char* help) { line(path, d, help); }
  void number(double&, const char* path, double d, double, double, const char* help) { line(path, d, help); }
  void flag(bool&, const char* path, bool d, const char* help) { line(path, d, help); }
  void text(std::string&, const char* path, const char* d, const char* help) { line(path, d, help); }
  void choice(std::string&, const char* path, const char* d, std::initializer_list<const char*>, const char* help) {
    line(path, d, help);
  }
  void pair(std::array<double, 2>&, const char* path, std::array<double, 2> d, double, double, const char* help) {
    line(path, json::array({d[0], d[1]}), help);
  }
  void strings(std::vector<std::string>&, const char* path, std::vector<std::string> d, const char* help) {
    line(path, d, help);
  }
  void micro_batch(int64_t&, const char* path, int64_t d, const char* help) { line(path, d, help); }
  void checkpointing(std::string&, const char* path, const char* d, const char* help) { line(path, d, help); }
};

// Applies "a.b=value" to the nested JSON.
void apply_override(json& j, const std::string& text) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) {
    throw Error("--set " + text + ": expected KEY=VALUE, e.g. --set train.micro_batch_size=4");
  }
  const std::string key = text.substr(0, eq), raw = text.substr(eq + 1);
  json value;
  try {
    value = parse_json_limited(raw, "--set " + key);
  } catch (const json::exception&) {
    value = raw;  // a bare word is a string
  }
  json* node = &j;
  std::string p = key;
  size_t dot;
  while ((dot = p.find('.')) != std::string::npos) {
    node = &(*node)[p.substr(0, dot)];
    if (!node->is_object() && !node->is_null()) throw Error("--set " + text + ": " + key + " is not an option");
    p = p.substr(dot + 1);
  }
  (*node)[p] = value;
}

}  // namespace

TrainConfig::TrainConfig() {
  DefaultsVisitor v;
  visit(v);
}

TrainConfig TrainConfig::parse(const json& j, const std::vector<std::string>& overrides, const std::string& where) {
  if (!j.is_object()) throw Error(where + ": expected a JSON object");
  json merged = j;
  for (const auto& o : overrides) apply_override(merged, o);
  TrainConfig c;
  PathsVisitor paths;
  c.visit(paths);
  std::map<std::string, json> values;
  flatten(merged, "", paths.paths, values);
  ParseVisitor v{values, where};
  c.visit(v);
  if (!values.empty()) {  // unknown keys: name the first and the options of its section
    const std::string key = values.begin()->first;
    const std::string section = key.substr(0, key.find('.'));
    PrintVisitor p;
    c.visit(p);
    std::string hint;
    if (p.out.contains(section) && p.out[section].is_object()) {
      for (const auto& [k, _] : p.out[section].items()) hint += (hint.empty() ? "" : ", ") + section + "." + k;
    }
    if (key == "eval.max_batches") {  // counted batches, so the validation set changed with the micro batch
      throw Error(where + ": eval.max_batches was replaced by eval.max_sequences (validation windows, the same set "
                          "whatever the micro batch, eval batch or number of ranks; 0 = all)");
    }
    throw Error(where + ": " + key + ": unknown option" + (hint.empty() ? "" : " (options here: " + hint + ")"));
  }
  // Cross-field rules.
  if (c.model.init_from.empty() == c.model.preset.empty()) {
    throw Error(where + ": give exactly one of model.init_from (a model folder) or model.preset");
  }
  if (c.data.train.empty()) throw Error(where + ": data.train: required (a glob of training shards)");
  if (c.train.max_steps == 0 && c.train.epochs == 0) {
    throw Error(where + ": train.max_steps or train.epochs: one must be > 0");
  }
  if (c.train.min_lr > c.train.lr) throw Error(where + ": train.min_lr must not exceed train.lr");
  if (c.train.global_batch_size > 0 && c.train.gradient_accumulation_steps > 0 && !c.micro_batch_auto() &&
      c.train.global_batch_size != c.train.micro_batch_size * c.train.gradient_accumulation_steps) {
    throw Error(where + ": train.global_batch_size (" + std::to_string(c.train.global_batch_size) +
                ") != train.micro_batch_size * train.gradient_accumulation_steps (" +
                std::to_string(c.train.micro_batch_size) + " * " + std::to_string(c.train.gradient_accumulation_steps) +
                "); set only one of the last two");
  }
  if (c.train.global_batch_size > 0 && !c.micro_batch_auto() && c.train.global_batch_size % c.train.micro_batch_size) {
    throw Error(where + ": train.global_batch_size (" + std::to_string(c.train.global_batch_size) +
                ") is not divisible by train.micro_batch_size (" + std::to_string(c.train.micro_batch_size) + ")");
  }
  if (!c.cuda.memory_limit.empty()) parse_memory_size(c.cuda.memory_limit, where + ": cuda.memory_limit");
  if (!c.cpu.memory_limit.empty()) parse_memory_size(c.cpu.memory_limit, where + ": cpu.memory_limit");
  if (c.micro_batch_auto() && c.train.global_batch_size == 0 && c.train.gradient_accumulation_steps == 0) {
    throw Error(where + ": train.micro_batch_size \"auto\" needs train.global_batch_size (the micro batch then divides "
                        "it), or train.gradient_accumulation_steps (the global batch is then the micro batch it picks "
                        "x accumulation x ranks, as Hugging Face's)");
  }
  if (c.preference_training() && c.dpo.reference == "base" && !c.lora()) {
    throw Error(where + ": dpo.reference \"base\" is the base model with the LoRA adapters switched off, and this "
                        "run has none (model.lora.rank 0): use \"precomputed\" (the default) or \"model\"");
  }
  if (c.preference_training() && c.dpo.label_smoothing > 0 && c.dpo.loss != "sigmoid") {
    throw Error(where + ": dpo.label_smoothing applies to dpo.loss \"sigmoid\" only, and dpo.loss is \"" +
                c.dpo.loss + "\"");
  }
  // Options that could never act.
  if (c.data.val.empty()) {
    for (const auto& [on, key] : {std::pair<bool, const char*>{c.checkpoint.keep_best, "checkpoint.keep_best"},
                                  {c.eval.early_stopping_patience > 0, "eval.early_stopping_patience"}}) {
      if (on) throw Error(where + ": " + key + " needs validation data, and data.val is empty: set data.val, or drop " + key);
    }
  }
  if (c.eval.early_stopping_patience > 0 && c.eval.every_steps == 0) {
    throw Error(where + ": eval.early_stopping_patience (" + std::to_string(c.eval.early_stopping_patience) +
                ") counts validations without improvement, and eval.every_steps 0 validates once, at the end: set "
                "eval.every_steps, or drop eval.early_stopping_patience");
  }
  // The run writes into output_dir: it must not be a folder the run reads from.
  const auto same_folder = [](const std::string& a, const std::string& b) {
    if (a.empty() || b.empty()) return false;
    std::error_code ec;
    return std::filesystem::weakly_canonical(a, ec) == std::filesystem::weakly_canonical(b, ec);
  };
  for (const auto& [key, path] : {std::pair<const char*, const std::string*>{"model.init_from", &c.model.init_from},
                                  {"model.lora.init_from", &c.model.lora.init_from}}) {
    if (same_folder(c.output_dir, *path)) {
      throw Error(where + ": output_dir is the folder of " + key + " (" + *path + "); the run would write its "
                  "checkpoints and records into the model it starts from. Use another output_dir");
    }
  }
  return c;
}

TrainConfig TrainConfig::from_file(const std::string& path, const std::vector<std::string>& overrides) {
  json j;
  try {
    j = parse_json_limited(read_text_file(path), path, /*ignore_comments=*/true);
  } catch (const json::exception& e) {
    throw Error(path + ": not valid JSON (" + e.what() + ")");
  }
  return parse(j, overrides, path);
}

json TrainConfig::to_json() const {
  PrintVisitor p;
  const_cast<TrainConfig*>(this)->visit(p);
  return p.out;
}

std::string TrainConfig::help_text() {
  TrainConfig c;
  HelpVisitor h;
  c.visit(h);
  return h.out.str();
}

int64_t TrainConfig::checkpoint_every_n_blocks() const {
  if (model.activation_checkpointing == "none" || model.activation_checkpointing == "auto") return 0;
  if (model.activation_checkpointing == "all") return 1;
  return std::stoll(model.activation_checkpointing);
}

LoraConfig TrainConfig::lora_config() const {
  const auto& o = model.lora;
  LoraConfig lora;
  lora.rank = o.rank;
  lora.alpha = o.alpha;
  lora.targets = o.targets;
  if (!o.init_from.empty()) {
    lora = read_adapter_config(o.init_from);
    if (o.rank != 0 && o.rank != lora.rank) {
      throw Error("model.lora.rank is " + std::to_string(o.rank) + " but the adapter in model.lora.init_from (" +
                  o.init_from + ") has r " + std::to_string(lora.rank) + "; set model.lora.rank to 0 or " +
                  std::to_string(lora.rank));
    }
  }
  lora.dropout = o.dropout;
  return lora;
}

}  // namespace gpt2ft
