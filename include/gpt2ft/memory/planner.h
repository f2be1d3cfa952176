// The memory planner: expected peak memory of a training step, split by what holds it, and
// the largest micro batch that fits a memory budget. Weights, gradients and optimizer state
// are exact byte counts of the tensors the trainer creates; the activation terms count what
// our forward pass saves for backward and what backward allocates on top (derived in
// planner.cpp and docs/memory.md), per sequence.
//
// A step's memory peaks in one of four phases, each a straight line in the micro batch m:
//   forward end   resident + held gradients + loss workspace            + m * activations
//   backward      resident + held gradients + d lm_head                  + m * (activations + backward)
//   recomputing the lowest checkpointed block
//                 resident + the gradients above it + d lm_head          + m * (its recomputation)
//   backward end  resident - autocast's casts (freed by backward) + all gradients + the embedding's
//                 dense gradient + m * (d residual)
// "Held gradients" are all of them when the step accumulates several micro batches (they
// exist from the first one on) and none otherwise (set to none after every step, they grow
// while backward frees the activations).
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
  bool cuda = true;                   // CUDA kernels (flash / memory-efficient attention) rather than the CPU's
  int64_t world_size = 1;             // data-parallel ranks (one GPU each)
  bool chunked_loss = true;           // train.chunked_loss: no whole-batch logits
  bool shard_optimizer = false;       // ZeRO-1 (with world_size > 1)
  int64_t global_batch = 0;           // sequences per optimizer step over all ranks; 0: unknown (assume accumulation)
  // LoRA: adapters of rank lora_rank on the targeted projections train; the base is frozen
  // and stored in base_bytes per parameter.
  int64_t lora_rank = 0;
  std::vector<std::string> lora_targets;
  bool lora_dropout = false;
  int64_t base_bytes = 4;
  bool optimizer_offload = false;     // train.optimizer_offload "cpu": AdamW's state on the host
  bool optimizer_8bit = false;        // train.optimizer "adamw_8bit": 8-bit moments (optim/adamw_8bit.h)
  bool quantize_embeddings = false;   // ... for the embeddings too (train.adamw_8bit.embeddings "8bit")
  bool lora_embeddings = false;       // LoRA trains the embedding in full (a chat template's new tokens)
  bool packed_documents = false;      // document shards packed whole: positions and an attention mask per sequence
  // Preference training (DPO): a sample is a pair of rows, the loss takes per-row log-probs
  // (the LM head's gradient is formed in backward), and the reference may add a frozen copy's
  // weights and a no-grad forward per micro batch (train/preference_reference.h).
  int64_t sequences_per_sample = 1;   // 2 for DPO: "per sequence" below is then per pair
  int64_t head_rows_per_sample = 0;   // DPO: the most target rows of a pair, which reach the LM head (0: every row)
  bool target_logprobs = false;       // the loss is linear_target_logprobs, not linear_cross_entropy
  int64_t reference_weights = 0;      // dpo.reference "model": the copy's bytes; "base": a kept embedding
  bool reference_forward = false;     // dpo.reference "base" or "model": a reference pass per micro batch
};

struct MemoryPlan {
  // Resident through the whole step.
  int64_t weights = 0;           // float32 parameters
  int64_t optimizer = 0;         // AdamW exp_avg + exp_avg_sq (+ step counters); 8-bit: codes, scales and
                                 // the float32 moments of small tensors
  int64_t amp_copies = 0;        // 16-bit casts of the weights saved for backward (blocks not checkpointed,
                                 // plus the one block being recomputed)
  int64_t workspace = 0;         // cuBLAS workspace
  int64_t gradient_buckets = 0;  // data parallel: the flat all-reduce buckets (a float32 copy of the gradients)
  int64_t reference = 0;         // DPO's frozen reference copy ("model"), or kept embedding ("base")
  // Gradients.
  int64_t gradients = 0;          // float32 gradients of trained parameters (all of them)
  int64_t lm_head_gradient = 0;   // d lm_head weight (float32, V x C), formed in the loss's forward
  int64_t embedding_gradient = 0; // the embedding's dense gradient, added into d wte at the end of backward
  // Forward-time workspace of the loss: a chunk of logits, the 16-bit lm_head copy, d lm_head;
  // at its largest (a whole chunk of rows). A micro batch of fewer rows than a chunk holds
  // only its own rows: loss_workspace_at(m).
  int64_t loss_workspace = 0;
  int64_t loss_chunk_rows = 0;       // rows of a chunk (0: the eager loss)
  // Per-row log-probs (DPO): d lm_head is formed at the start of backward, where the chunks'
  // logits are recomputed (and the 16-bit head cast again): this workspace then, beside it.
  bool loss_gradient_in_backward = false;
  int64_t loss_backward_workspace = 0;
  int64_t loss_bytes_per_row = 0;    // a chunk row's logits (and their 16-bit copy) and hidden row
  int64_t tokens_per_sequence = 0;   // T
  int64_t head_rows_per_sequence = 0;  // rows of a sequence that reach the LM head (the targets; T when unknown)
  // Per sequence of the micro batch.
  int64_t activations_per_sequence = 0;  // saved for backward, with the configured checkpointing
  int64_t activations_per_sequence_no_checkpointing = 0;
  int64_t activations_per_sequence_all_checkpointed = 0;
  int64_t logits_per_sequence = 0;       // eager: logits, their float32 copy, log-softmax and its gradient;
                                         // chunked: the saved float32 d hidden
  int64_t backward_per_sequence = 0;     // backward's own buffers: d residual, a block's transient gradients,
                                         // and a checkpointed block's recomputed activations
  int64_t residual_gradient_per_sequence = 0;  // d residual at the end of backward
  int64_t reference_per_sequence = 0;          // DPO's reference pass after the policy's forward: its transient
                                               // residual stream and one block's intermediates
  // Recomputing the lowest checkpointed block, late in backward: without accumulation the
  // gradients of everything above it exist by then, while little is left of the activations.
  int64_t first_recompute_gradients = 0;
  int64_t first_recompute_per_sequence = 0;     // 0: no block is checkpointed
  int64_t per_rank_batch = 0;                  // global_batch / world_size (0: unknown)
  int64_t host_bytes = 0;                      // optimizer offload: what the host holds (weights' copy,
                                               // moments, gradient buffer: 16 bytes a trained parameter)

  // The phases at micro batch m.
  int64_t loss_workspace_at(int64_t m) const;
  int64_t forward_peak(int64_t m) const;
  int64_t backward_peak(int64_t m) const;
  int64_t first_recompute_peak(int64_t m) const;
  int64_t backward_end_peak(int64_t m) const;
  int64_t peak(int64_t m) const;
  // The resident bytes and the per-sequence slope of the backward phase (the usual maximum),
  // with gradients held (accumulation).
  int64_t fixed() const;
  int64_t per_sequence() const;
  // The largest micro batch whose peak fits `budget` bytes (0 when not even 1 fits); at most
  // per_rank_batch when that is known. Not monotonic: the whole per-rank batch (no
  // accumulation, no gradients held across micro batches) may fit when a smaller micro batch
  // does not.
  int64_t largest_micro_batch(int64_t budget) const;
  // The largest micro batch below per_rank_batch (accumulating, so holding gradients) that fits.
  int64_t largest_accumulating_micro_batch(int64_t budget) const;
  nlohmann::json to_json(int64_t budget) const;

 private:
  int64_t resident() const { return weights + optimizer + amp_copies + workspace + gradient_buckets + reference; }
  int64_t held_gradients(int64_t m) const { return per_rank_batch > 0 && m >= per_rank_batch ? 0 : gradients; }
};

MemoryPlan plan_memory(const MemoryPlanInput& input);

// "80GiB", "24GB", "16000MiB", or a plain number of bytes.
int64_t parse_memory_size(const std::string& text, const std::string& where);

}  // namespace gpt2ft
