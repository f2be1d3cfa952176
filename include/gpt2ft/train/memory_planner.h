// The memory planner: expected peak memory of a training step, split by what holds it, and
// the largest micro batch that fits a memory budget. Weights, gradients and optimizer state
// are exact byte counts of the tensors the trainer creates; activations and logits follow
// from what our forward pass saves for backward (see memory_planner.cpp), per sequence.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <c10/core/ScalarType.h>
#include <nlohmann/json.hpp>

#include "gpt2ft/model/config.h"

namespace gpt2ft {

struct MemoryPlanInput {
  GPT2Config model;
  int64_t seq_len = 1024;
  c10::ScalarType amp = c10::kFloat;  // kFloat, kBFloat16 or kHalf
  int64_t checkpoint_every = 0;       // 0 none, 1 all, N every N-th block
  bool freeze_embeddings = false;     // model.freeze_embeddings: wte/wpe get no gradients or state
  int64_t freeze_blocks = 0;          // model.freeze_blocks: nor do the first N blocks
  bool dropout = false;               // dropout masks are kept too
  bool cuda = true;                   // CUDA kernels (flash attention) rather than the CPU's
  int64_t world_size = 1;             // data-parallel ranks (one GPU each)
  bool chunked_loss = true;           // train.chunked_loss: no whole-batch logits
  bool shard_optimizer = false;       // ZeRO-1 (with world_size > 1)
};

struct MemoryPlan {
  int64_t weights = 0;           // float32 parameters
  int64_t gradients = 0;         // float32 gradients of trained parameters
  int64_t optimizer = 0;         // AdamW exp_avg + exp_avg_sq (+ step counters)
  int64_t amp_copies = 0;        // 16-bit copies of the weights autocast caches for a step
  int64_t workspace = 0;         // cuBLAS/cuDNN workspaces and allocator slack (fixed estimate)
  int64_t gradient_buckets = 0;  // data parallel: the flat all-reduce buckets (a float32 copy of the gradients)
  int64_t loss_workspace = 0;    // chunked loss: one chunk of logits and the saved d lm_head weight
  int64_t activations_per_sequence = 0;  // kept for backward, with the configured checkpointing
  int64_t activations_per_sequence_no_checkpointing = 0;
  int64_t activations_per_sequence_all_checkpointed = 0;
  int64_t logits_per_sequence = 0;       // eager: logits, their float32 copy, log-softmax and its gradient;
                                         // chunked: the saved float32 d hidden

  int64_t fixed() const {
    return weights + gradients + optimizer + amp_copies + workspace + gradient_buckets + loss_workspace;
  }
  int64_t per_sequence() const { return activations_per_sequence + logits_per_sequence; }
  int64_t peak(int64_t micro_batch) const { return fixed() + micro_batch * per_sequence(); }
  // The largest micro batch whose peak fits `budget` bytes (0 when not even 1 fits).
  int64_t largest_micro_batch(int64_t budget) const;
  nlohmann::json to_json(int64_t budget) const;
};

MemoryPlan plan_memory(const MemoryPlanInput& input);

// "80GiB", "24GB", "16000MiB", or a plain number of bytes.
int64_t parse_memory_size(const std::string& text, const std::string& where);

}  // namespace gpt2ft
