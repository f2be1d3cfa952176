// The training configuration: one JSON file. Every option is declared once, in
// TrainConfig::visit, with its JSON path, default, range and help text; parsing, validation,
// `--help`, `--set` overrides and the printed resolved config all come from that declaration.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gpt2ft/model/lora_config.h"

namespace gpt2ft {

struct TrainConfig {
  struct Model {
    std::string init_from;                   // HF model folder
    std::string preset;                      // or a preset shape, randomly initialised
    double dropout = -1;                     // -1: keep the model's own dropout
    std::string activation_checkpointing;    // "none" | "all" | "auto" | "N" (every N-th block)
    bool freeze_embeddings = false;
    int64_t freeze_blocks = 0;
    int64_t resize_vocab = 0;                // 0: keep the model's vocabulary size
    struct Lora {
      int64_t rank = 0;                      // 0: full fine-tuning
      double alpha = 0, dropout = 0;
      std::vector<std::string> targets;
      std::string init_from;                 // a PEFT adapter folder to continue
      std::string base_dtype;                // "float32" | "bfloat16" | "float16"
    } lora;
  } model;
  struct Data {
    std::string train, val;
    int64_t seq_len = 0;
    int64_t num_workers = 0;
    int64_t seed = 0;
    bool shuffle = true;
    std::string packing;                     // "auto" | "documents" | "concat" (data/samples.h)
    std::string too_long;                    // "truncate" | "error"
  } data;
  struct Train {
    int64_t micro_batch_size = 0;            // 0 means "auto"
    int64_t gradient_accumulation_steps = 0; // 0: derived from global_batch_size (or 1)
    int64_t global_batch_size = 0;           // sequences per optimizer step; 0: micro * accumulation
    int64_t max_steps = 0;
    double epochs = 0;
    double lr = 0, min_lr = 0, weight_decay = 0, grad_clip = 0, eps = 0;
    std::string lr_schedule;
    int64_t warmup_steps = 0;
    std::array<double, 2> betas{};
    std::string optimizer;                   // "adamw" | "adamw_8bit" (optim/adamw_8bit.h)
    std::string adamw_8bit_embeddings;       // "float32" | "8bit": the embeddings' moments under adamw_8bit
    std::string fused_adamw;                 // "auto" | "on" | "off"
    bool chunked_loss = true;                // lm_head + cross-entropy without whole-batch logits
    std::string objective;                   // "auto" (the data's) | "dpo" (preference shards)
    bool deterministic = false;              // bitwise-equal runs (core/reproducible_math.h)
    std::string optimizer_offload;           // "none" | "cpu"
    int64_t seed = 0;
    double time_limit = 0;
  } train;
  struct Dpo {                              // train.objective "dpo" (train/objective.h)
    double beta = 0;
    std::string loss;                        // "sigmoid" | "ipo" | "hinge"
    double label_smoothing = 0;              // "sigmoid" only
    std::string reference;                   // "precomputed" | "base" (LoRA) | "model"
  } dpo;
  struct Attention {
    std::string packed;                      // "mask" | "varlen" (model/packed_attention.h)
  } attention;
  struct Amp {
    std::string dtype;                       // "auto" | "none" | "bfloat16" | "float16"
    double init_scale = 0, growth_factor = 0, backoff_factor = 0;
    int64_t growth_interval = 0;
  } amp;
  struct Checkpoint {
    int64_t every_steps = 0, keep_last = 0;
    bool at_end = true;
    bool keep_best = false;                  // <output_dir>/best: the lowest validation loss so far
    std::string resume;
  } checkpoint;
  struct Eval {
    int64_t every_steps = 0, max_sequences = 0;
    double every_epochs = 0;                 // also at these fractions of an epoch (0: off)
    int64_t early_stopping_patience = 0;     // stop after N evaluations without improvement (0: off)
    double early_stopping_min_delta = 0;
    int64_t batch_size = 0;                  // 0: the training micro batch
  } eval;
  struct Log {
    int64_t every_steps = 0;
    bool tensorboard = true;                 // event files under <output_dir>/tensorboard
    std::string progress;                    // "auto" | "bar" | "lines"
  } log;
  struct Oom {
    std::string policy;
    int64_t min_micro_batch_size = 0;
  } oom;
  struct Distributed {
    std::string backend;                     // "auto" | "nccl" | "gloo"
    double timeout_s = 0;
    double bucket_mb = 0;
    bool shard_optimizer = false;            // ZeRO-1
  } distributed;
  struct Cuda {
    bool tf32 = true;
    bool expandable_segments = true;
    std::string memory_limit;                // "" or a size ("24GiB")
  } cuda;
  struct Cpu {
    std::string memory_limit;                // "" or a size: the counting allocator refuses past it
  } cpu;
  std::string output_dir;
  std::string device;
  std::string save_dtype;

  // Calls the visitor once per option: v.integer / v.number / v.flag / v.text / v.choice /
  // v.pair / v.strings / v.micro_batch / v.checkpointing (field, "json.path", default, ..., "help").
  template <class Visitor>
  void visit(Visitor& v);

  // The defaults of every option.
  TrainConfig();
  // Parses a config JSON after applying `overrides` ("a.b=value", value as JSON or a bare
  // string). Unknown keys, wrong types and out-of-range values are Errors naming the path.
  static TrainConfig parse(const nlohmann::json& j, const std::vector<std::string>& overrides = {},
                           const std::string& where = "config");
  static TrainConfig from_file(const std::string& path, const std::vector<std::string>& overrides = {});
  // Every option with its value (the resolved config; feeding it back gives the same config).
  nlohmann::json to_json() const;
  // One line per option: path, default and help.
  static std::string help_text();

  // Derived values.
  bool micro_batch_auto() const { return train.micro_batch_size == 0; }
  // Blocks to checkpoint: 0 none, 1 all, N every N-th ("auto" is 0 until the trainer or the
  // planner resolves it).
  int64_t checkpoint_every_n_blocks() const;
  bool checkpointing_auto() const { return model.activation_checkpointing == "auto"; }
  // LoRA is on (model.lora.rank > 0 or model.lora.init_from).
  bool preference_training() const { return train.objective == "dpo"; }
  // The dropout the model trains with: model.dropout, or under DPO 0 unless set (TRL's
  // disable_dropout); -1 keeps the model's own.
  double model_dropout() const { return model.dropout >= 0 ? model.dropout : preference_training() ? 0.0 : -1.0; }
  bool lora() const { return model.lora.rank > 0 || !model.lora.init_from.empty(); }
  // The adapters' settings: model.lora.*, or the r, alpha and targets of the PEFT folder in
  // model.lora.init_from (whose adapter_config.json this reads), with model.lora.dropout.
  LoraConfig lora_config() const;
};

}  // namespace gpt2ft
