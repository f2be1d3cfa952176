// Memory planner. What libtorch allocates for one training step of our GPT-2 (see
// docs/memory.md for the derivation), with b the bytes of the compute dtype (2 under 16-bit
// autocast, 4 without), per token of the micro batch:
//
// A block that is not checkpointed keeps for backward
//   its input x and the mid-block residual h, float32 (layer norms save their inputs)  2 x 4C
//   the layer norms' mean and rstd                                                   2 x 8
//   ln_1's and ln_2's outputs cast to b (saved by c_attn and c_fc)                    2 x bC
//   qkv (q, k and v are views of it, saved by SDPA)                                   3 x bC
//   the attention output (SDPA's output is laid out (B, T, NH, HD), so the
//   transpose + contiguous before c_proj is free and c_proj saves the same storage)   bC
//   flash / memory-efficient attention's log-sum-exp, float32                         4 NH
//   c_fc's output (saved by gelu) and gelu's output (saved by c_proj)                2 x bI
//   two residual-dropout masks, when dropout is on (flash attention's dropout keeps
//   only an RNG offset): bool on CUDA, the masked tensor's dtype on the CPU           2 x C (2 x bC)
// On the CPU with dropout SDPA takes the math path instead, in float32: it keeps q and k
// scaled, the attention probabilities, their dropout mask and the dropped probabilities
// (8C + 12 NH T, measured with PyTorch's saved-tensor hooks) and no log-sum-exp.
// Leading blocks that are frozen behind a frozen embedding keep nothing.
// A checkpointed block keeps only its input (4C). The final layer norm keeps the last
// block's output (4C + 8). The embedding's dropout keeps a mask (C; 4C on the CPU).
// Under autocast the blocks' matmul weights are cast to b and cached for the forward pass;
// the casts stay alive while backward needs them (2 bytes per matmul parameter of the blocks
// not checkpointed); a checkpointed block's casts live only while it is recomputed.
//
// The loss. Chunked: forward holds one chunk of R rows of logits (float32, and briefly with
// the b copy they came from or the b gradient made from them; 4 bytes in all without
// autocast), the chunk of hidden rows cast to b, the lm_head weight cast to b once
// (2VC) and d lm_head (4VC, kept into backward), and keeps d hidden (4C per token) for
// backward. Eager: the logits in b, their float32 copy, log-softmax and its gradient
// ((b + 12) V per token) and the cast lm_head weight.
//
// Packed documents (data.packing "documents") add per sequence the attention mask, one (T, T)
// block in b with its rows 16 values apart (T rounded up to 16), shared by every layer and kept
// into backward (attention.packed "varlen" needs none, but the mask is the default and planned), and the loader's rows x, y and
// positions (3 x 8T, where plain text has x and y as views of one row of T+1 tokens).
//
// Backward adds, per token: d residual (4C, float32) and a block's transient gradients (at
// most the MLP's two (I) gradients in b and the (C) one), and for checkpointed blocks the
// recomputed block's activations. At the end of backward the embedding's dense gradient
// (4VC) is formed and added into d wte.
//
// Optimizer offload (train.optimizer_offload "cpu") keeps AdamW's moments on the host, with a
// float32 copy of the weights it updates and a gradient buffer: 16 bytes a trained parameter
// of host memory instead of 8 on the GPU (training on the CPU, all 16 in the one memory).
//
// LoRA trains only the adapters (A and B per targeted projection): their gradients and AdamW
// state are all that scale with training; the frozen base is 4 or 2 bytes a parameter (a
// 16-bit base needs no autocast copies), no lm_head or embedding gradient exists, and each
// adapter keeps its rank-r output (and its dropped-out input when lora dropout is on).
//
// Gradients (4 bytes per trained element) are held from the first micro batch on when the
// step accumulates; without accumulation they are created while backward frees the
// activations. ZeRO-1 (shard_optimizer) keeps the optimizer state of the rank that owns the
// most elements. Data parallel (world_size > 1) adds the gradient buckets: a float32 copy of
// the trained gradients, per GPU. cuBLAS keeps a 32 MiB workspace (Hopper's default size;
// smaller GPUs use less) per handle and stream, and every thread has its own handle: one for
// the training thread's forward, one for autograd's backward thread.
#include "gpt2ft/memory/planner.h"

#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/optim/adamw_8bit.h"
#include "gpt2ft/optim/adamw_8bit_cuda.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "gpt2ft/core/error.h"
#include "gpt2ft/core/strings.h"
#include "gpt2ft/distributed/optimizer_shards.h"
#include "gpt2ft/model/finetune.h"
#include "gpt2ft/model/linear_cross_entropy.h"
#include "gpt2ft/model/lora.h"

namespace gpt2ft {

namespace {

// The sizes the terms are made of.
struct Dims {
  int64_t C, I, T, L, V, NH;
  int64_t b;  // bytes of the compute dtype
  explicit Dims(const MemoryPlanInput& in)
      : C(in.model.n_embd), I(in.model.inner_dim()), T(in.seq_len), L(in.model.n_layer), V(in.model.vocab_size),
        NH(in.model.n_head), b(in.amp == c10::kFloat ? 4 : 2) {}
};

constexpr const char* kBlockMatmuls[] = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"};

bool lora_on(const MemoryPlanInput& in, const std::string& module) {
  return in.lora_rank > 0 && lora_targets(module, in.lora_targets);
}

// The trained tensors' element counts, in the model's order: freezing as model/finetune does;
// with LoRA the adapters, A (r, in) and B (out, r) on each targeted projection.
// below_block: the elements of those in the embeddings and blocks 0 to below_block.
// names: the tensors' names, in the same order.
std::vector<int64_t> trained_numels(const MemoryPlanInput& in, int64_t below_block = -1, int64_t* below = nullptr,
                                    std::vector<std::string>* names = nullptr) {
  std::vector<int64_t> numels;
  std::vector<std::string> trained_names;
  for (const auto& [name, shape] : in.model.parameter_shapes()) {
    const int64_t numel = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
    const size_t at = numels.size();
    const std::string module = name.substr(0, name.rfind('.'));
    if (in.lora_rank == 0) {
      if (!is_frozen(name, in.freeze_embeddings, in.freeze_blocks)) numels.push_back(numel), trained_names.push_back(name);
    } else if (shape.size() == 2 && ends_with(name, ".weight") && module.find(".h.") != std::string::npos &&
               lora_on(in, module)) {
      numels.push_back(in.lora_rank * shape[1]);  // A
      numels.push_back(shape[0] * in.lora_rank);  // B
      trained_names.push_back(module + ".lora_A.weight");
      trained_names.push_back(module + ".lora_B.weight");
    } else if (in.lora_embeddings && (name == "transformer.wte.weight" || name == "lm_head.weight")) {
      numels.push_back(numel);  // modules_to_save: trained in full beside the adapters
      trained_names.push_back(name);
    }
    const size_t h = name.find(".h.");
    const bool low = h == std::string::npos || std::stoll(name.substr(h + 3)) <= below_block;
    if (below != nullptr && low) *below += std::accumulate(numels.begin() + static_cast<std::ptrdiff_t>(at), numels.end(), int64_t{0});
  }
  if (names != nullptr) *names = std::move(trained_names);
  return numels;
}

// Leading frozen blocks behind a frozen embedding: nothing before them needs a gradient, so
// autograd saves nothing in them (and the autocast cache keeps no casts of frozen weights).
int64_t silent_blocks(const MemoryPlanInput& in) {
  return in.lora_rank == 0 && in.freeze_embeddings ? std::min(in.freeze_blocks, in.model.n_layer) : 0;
}

bool checkpointed_block(int64_t i, int64_t every) { return every > 0 && i % every == 0; }

// A dropout mask's bytes per element: CUDA's fused dropout keeps a bool mask; the CPU's
// multiplies by a mask of the input's dtype and keeps that.
int64_t mask_bytes(const MemoryPlanInput& in, int64_t dtype_bytes) { return in.cuda ? 1 : dtype_bytes; }

// What block i keeps for backward, per token, when it is not checkpointed (see the top of
// this file). A matmul keeps its input only for its own weight's gradient: a frozen weight's
// does not (its input gradient needs the weight alone), a LoRA adapter's A keeps the same
// input (or, with LoRA dropout, its dropped-out copy and mask instead).
int64_t block_bytes_per_token(const MemoryPlanInput& in, const Dims& d, int64_t i) {
  const int64_t C = d.C, I = d.I, b = d.b, NH = d.NH;
  const bool lora = in.lora_rank > 0;
  const bool block_trained = !lora && i >= in.freeze_blocks;
  int64_t bytes = 2 * (4 * C + 8) + 3 * b * C + b * C + 4 * NH + b * I;  // norms' inputs, qkv, attention out, gelu's input
  if (lora && i == 0) bytes -= 4 * C + 8;  // ln_1 of the first block: nothing before it trains
  const int64_t inputs[] = {C, C, C, I};  // the four matmuls' input widths
  const int64_t input_bytes[] = {4, b, 4, b};  // ... and dtypes: the layer norms' outputs are float32
  bool proj_keeps_input = block_trained;
  for (size_t k = 0; k < 4; ++k) {
    const bool adapter = lora_on(in, kBlockMatmuls[k]);
    const bool keeps = block_trained || (adapter && !in.lora_dropout);
    if (k == 1) proj_keeps_input = keeps;
    else bytes += keeps ? b * inputs[k] : 0;  // attn.c_proj's input is SDPA's saved output anyway
    // The adapter: B keeps A's rank-r output; with LoRA dropout A keeps the dropped-out input
    // (cast to b) and dropout its mask.
    if (adapter) bytes += b * in.lora_rank + (in.lora_dropout ? inputs[k] * (b + mask_bytes(in, input_bytes[k])) : 0);
  }
  if (in.dropout) bytes += 2 * C * mask_bytes(in, b);  // the residual dropouts' masks (on c_proj's outputs)
  if (!in.cuda && in.dropout) {
    // With dropout the CPU's SDPA takes the math path (in float32 whatever the input), which
    // keeps q and k scaled (8C), the attention probabilities, their dropout mask and the
    // dropped probabilities (3 x 4 NH T), and v: a view of qkv in float32, its float32 copy
    // under autocast. No log-sum-exp; its output is copied for c_proj, which alone keeps it.
    bytes += (b == 4 ? 8 * C : 12 * C - 3 * b * C) + 12 * NH * d.T - 4 * NH - (proj_keeps_input ? 0 : b * C);
  }
  return bytes;
}

struct SavedActivations {
  int64_t per_token = 0;   // kept through the forward pass
  int64_t recompute = 0;   // what recomputing a checkpointed block adds at the most in backward
  int64_t first_checkpointed = -1;  // the lowest checkpointed block that keeps anything (-1: none)
  int64_t first_recompute = 0;      // what is kept while it is recomputed, its recomputation included
};

SavedActivations saved_activations(const MemoryPlanInput& in, const Dims& d, int64_t every) {
  SavedActivations s;
  std::vector<int64_t> kept(static_cast<size_t>(d.L), 0), recomputed(static_cast<size_t>(d.L), 0);
  for (int64_t i = silent_blocks(in); i < d.L; ++i) {
    const int64_t block = block_bytes_per_token(in, d, i);
    const bool checkpointed = checkpointed_block(i, every);
    kept[static_cast<size_t>(i)] = checkpointed ? 4 * d.C : block;  // a checkpointed block keeps its input
    if (checkpointed) recomputed[static_cast<size_t>(i)] = block;
    s.per_token += kept[static_cast<size_t>(i)];
  }
  // Backward recomputes block i after the blocks above it have freed what they kept.
  int64_t freed_above = 0;
  for (int64_t i = d.L - 1; i >= 0; --i) {
    s.recompute = std::max(s.recompute, recomputed[static_cast<size_t>(i)] - freed_above);
    freed_above += kept[static_cast<size_t>(i)];
  }
  const int64_t embedding_mask = in.dropout ? d.C * mask_bytes(in, 4) : 0;
  s.per_token += 4 * d.C + 8 + embedding_mask;  // the final norm's input, the embedding's dropout mask
  for (int64_t i = 0, below = embedding_mask; i < d.L && s.first_checkpointed < 0; below += kept[static_cast<size_t>(i++)]) {
    if (recomputed[static_cast<size_t>(i)] > 0) s.first_checkpointed = i, s.first_recompute = below + 4 * d.C + recomputed[static_cast<size_t>(i)];
  }
  return s;
}

// Weights, optimizer state (ZeRO-1: the most loaded rank's; offload: on the host), gradients,
// autocast's copies and the workspaces that do not depend on the micro batch.
void plan_resident(const MemoryPlanInput& in, const Dims& d, const std::vector<int64_t>& trained_numels,
                   const std::vector<std::string>& trained_names, MemoryPlan& m) {
  const bool lora = in.lora_rank > 0;
  const int64_t trained = std::accumulate(trained_numels.begin(), trained_numels.end(), int64_t{0});
  const int64_t P = in.model.num_parameters();
  m.weights = lora ? in.base_bytes * P + 4 * trained : 4 * P;
  m.gradients = 4 * trained;
  // Two moments per element and a float32 step per tensor; 8-bit: codes and block scales for
  // tensors torchao quantizes, float32 moments for the others.
  const auto state_bytes = [&](size_t i) {
    const int64_t numel = trained_numels[i];
    return in.optimizer_8bit ? adamw_8bit_state_bytes(trained_names[i], numel, in.quantize_embeddings) : 8 * numel + 4;
  };
  m.optimizer = 0;
  for (size_t i = 0; i < trained_numels.size(); ++i) m.optimizer += state_bytes(i);
  int64_t owned = trained;  // trained elements whose optimizer state this rank keeps
  if (in.shard_optimizer && in.world_size > 1) {
    // ZeRO-1: the most loaded rank's share, under the partition the trainer uses.
    const std::vector<int> owner = partition_parameters(trained_numels, static_cast<int>(in.world_size));
    std::vector<int64_t> bytes(static_cast<size_t>(in.world_size), 0), elements(bytes.size(), 0);
    for (size_t i = 0; i < owner.size(); ++i) {
      bytes[static_cast<size_t>(owner[i])] += state_bytes(i);
      elements[static_cast<size_t>(owner[i])] += trained_numels[i];
    }
    m.optimizer = *std::max_element(bytes.begin(), bytes.end());
    owned = *std::max_element(elements.begin(), elements.end());
  }
  if (in.optimizer_offload) {  // the state moves to the host, with a weights' copy and a gradient buffer
    m.host_bytes = 8 * owned + (in.optimizer_8bit ? m.optimizer : 8 * owned);  // weights' copy, gradients, state
    m.optimizer = in.cuda ? 0 : m.host_bytes;  // training on the CPU, the host is the device
  }
  if (d.b == 2 && !(lora && in.base_bytes == 2)) {  // a 16-bit base needs no casts
    const int64_t C = d.C, I = d.I;
    const int64_t block_matmul_params = C * 3 * C + 3 * C + C * C + C + C * I + I + I * C + C;  // weights and biases
    int64_t kept = 0, checkpointed = 0;  // blocks whose casts live through the step, and checkpointed ones
    for (int64_t i = silent_blocks(in); i < d.L; ++i) (checkpointed_block(i, in.checkpoint_every) ? checkpointed : kept)++;
    m.amp_copies = 2 * block_matmul_params * (kept + (checkpointed > 0 ? 1 : 0));
    if (!in.chunked_loss) m.amp_copies += 2 * d.V * C;  // the eager lm_head's cast, saved by its matmul
  }
  m.workspace = in.cuda ? 2 * (32ll << 20) : 0;  // forward's handle and the autograd thread's
  if (in.optimizer_8bit && !in.optimizer_offload && in.cuda && !trained_numels.empty() &&
      !adamw_8bit_cuda_kernel_available()) {
    // Without the CUDA kernel, the 8-bit step's float32 temporaries (the ATen ops, every tensor
    // in pieces) for one piece of at most 2^22 values (dequantized moments, their squares and
    // quotients, the updated weights: ~8 copies). The kernels (CPU and CUDA) allocate no tensor.
    m.workspace += 8 * 4 * std::min<int64_t>(int64_t{1} << 22, *std::max_element(trained_numels.begin(), trained_numels.end()));
  }
  m.gradient_buckets = in.world_size > 1 ? 4 * trained : 0;
  const bool lm_head_trained = !lora && (!in.model.tie_word_embeddings || !in.freeze_embeddings);
  m.lm_head_gradient = lm_head_trained ? 4 * d.V * d.C : 0;
  m.embedding_gradient = !lora && !in.freeze_embeddings ? 4 * d.V * d.C : 0;
}

// The loss: the chunked loss's workspace and saved d hidden, or the eager logits.
void plan_loss(const MemoryPlanInput& in, const Dims& d, MemoryPlan& m) {
  const int64_t V = d.V, C = d.C, T = d.T, b = d.b;
  if (in.chunked_loss) {
    const int64_t rows = linear_cross_entropy_chunk_rows(V, in.cuda);
    const bool head_cast = b == 2 && !(in.lora_rank > 0 && in.base_bytes == 2);  // a 16-bit head is used as it is
    m.loss_chunk_rows = rows;
    m.loss_bytes_per_row = V * (b == 4 ? 4 : 4 + b) + C * b;
    // Per-row log-probs (DPO) form d lm_head in backward, when the chunks are recomputed.
    m.loss_workspace = rows * m.loss_bytes_per_row + (head_cast ? 2 * V * C : 0) +
                       (in.target_logprobs ? 0 : m.lm_head_gradient);
    if (in.target_logprobs) {
      m.loss_gradient_in_backward = true;
      m.loss_backward_workspace = rows * m.loss_bytes_per_row + (head_cast ? 2 * V * C : 0);
    }
    m.logits_per_sequence = 4 * C * T;
  } else {
    m.loss_workspace = 0;
    m.lm_head_gradient = 0;  // formed in backward, like every other gradient
    m.logits_per_sequence = (b + 12) * V * T;
  }
}

}  // namespace

MemoryPlan plan_memory(const MemoryPlanInput& in) {
  const Dims d(in);
  MemoryPlan m;
  m.tokens_per_sequence = d.T;
  m.head_rows_per_sequence = d.T;
  m.per_rank_batch = in.global_batch > 0 ? in.global_batch / std::max<int64_t>(1, in.world_size) : 0;
  const SavedActivations configured = saved_activations(in, d, in.checkpoint_every);
  int64_t low_elements = 0;  // trained, in the embeddings and the blocks up to the first checkpointed one
  std::vector<std::string> trained_names;
  const std::vector<int64_t> trained = trained_numels(in, configured.first_checkpointed, &low_elements, &trained_names);
  plan_resident(in, d, trained, trained_names, m);
  const int64_t transient = 4 * d.C + 2 * d.b * d.I + d.b * d.C;  // d residual + a block's gradients
  if (configured.first_checkpointed >= 0) {
    m.first_recompute_gradients = m.gradients - 4 * low_elements;
    m.first_recompute_per_sequence = d.T * (configured.first_recompute + transient);
  }

  m.activations_per_sequence = d.T * configured.per_token;
  m.activations_per_sequence_no_checkpointing = d.T * saved_activations(in, d, 0).per_token;
  m.activations_per_sequence_all_checkpointed = d.T * saved_activations(in, d, 1).per_token;
  if (in.packed_documents) {
    const int64_t packing = d.b * d.T * document_mask_row(d.T) + 8 * (3 * d.T - (d.T + 1));
    m.activations_per_sequence += packing;
    m.activations_per_sequence_no_checkpointing += packing;
    m.activations_per_sequence_all_checkpointed += packing;
  }
  plan_loss(in, d, m);
  m.backward_per_sequence = d.T * (transient + configured.recompute);
  m.residual_gradient_per_sequence = d.T * 4 * d.C;
  if (in.reference_forward) m.reference_per_sequence = d.T * (8 * d.C + 2 * d.b * d.I);
  m.reference = in.reference_weights;
  if (in.sequences_per_sample > 1) {  // DPO: a sample is a pair of rows
    const int64_t S = in.sequences_per_sample;
    for (int64_t* term : {&m.activations_per_sequence, &m.activations_per_sequence_no_checkpointing,
                          &m.activations_per_sequence_all_checkpointed, &m.logits_per_sequence,
                          &m.backward_per_sequence, &m.residual_gradient_per_sequence,
                          &m.first_recompute_per_sequence, &m.reference_per_sequence, &m.tokens_per_sequence,
                          &m.head_rows_per_sequence}) {
      *term *= S;
    }
    if (in.head_rows_per_sample > 0) m.head_rows_per_sequence = std::min(m.head_rows_per_sequence, in.head_rows_per_sample);
  }
  return m;
}

int64_t MemoryPlan::loss_workspace_at(int64_t mb) const {
  if (loss_chunk_rows <= 0 || tokens_per_sequence <= 0) return loss_workspace;
  const int64_t rows = std::min(loss_chunk_rows, mb * head_rows_per_sequence);  // a chunk never exceeds the rows there are
  return loss_workspace - (loss_chunk_rows - rows) * loss_bytes_per_row;
}

int64_t MemoryPlan::forward_peak(int64_t mb) const {
  return resident() + held_gradients(mb) + loss_workspace_at(mb) +
         mb * (activations_per_sequence + logits_per_sequence + reference_per_sequence);
}

int64_t MemoryPlan::backward_peak(int64_t mb) const {
  const int64_t base = resident() + held_gradients(mb) + lm_head_gradient + mb * (activations_per_sequence + logits_per_sequence);
  if (!loss_gradient_in_backward) return base + mb * backward_per_sequence;
  // Per-row log-probs (DPO): backward starts with the loss's, which recomputes the chunks (no
  // more rows than there are) while every activation is still held; the blocks' own buffers
  // come after.
  const int64_t recompute = loss_workspace_at(mb) - loss_workspace + loss_backward_workspace;
  return base + std::max(recompute, mb * backward_per_sequence);
}

int64_t MemoryPlan::backward_end_peak(int64_t mb) const {
  // Autocast's casts were saved by the blocks' matmuls, which backward has freed by now. Per-row
  // log-probs' d lm_head (formed in backward) has become the tied weight's gradient by then.
  return resident() - amp_copies + gradients + (loss_gradient_in_backward ? 0 : lm_head_gradient) + embedding_gradient +
         mb * residual_gradient_per_sequence;
}

int64_t MemoryPlan::first_recompute_peak(int64_t mb) const {
  if (first_recompute_per_sequence == 0) return 0;
  const int64_t grads = held_gradients(mb) > 0 ? gradients : first_recompute_gradients;
  return resident() + grads + lm_head_gradient + mb * first_recompute_per_sequence;
}

int64_t MemoryPlan::peak(int64_t mb) const {
  return std::max({forward_peak(mb), backward_peak(mb), first_recompute_peak(mb), backward_end_peak(mb)});
}

int64_t MemoryPlan::fixed() const { return resident() + gradients + lm_head_gradient; }

int64_t MemoryPlan::per_sequence() const {
  return activations_per_sequence + logits_per_sequence + backward_per_sequence;
}

int64_t MemoryPlan::largest_accumulating_micro_batch(int64_t budget) const {
  // The largest m whose peak, with the gradients held between micro batches, is under the
  // budget. Every phase grows with m (the chunked loss's workspace too, up to its chunk), so
  // the peak does: a binary search over peak() itself, which holds them for m below the
  // per-rank batch.
  const int64_t limit = per_rank_batch > 0 ? per_rank_batch - 1 : int64_t{1} << 24;
  if (limit < 1 || peak(1) > budget) return 0;
  int64_t low = 1, high = limit;  // peak(low) fits
  while (low < high) {
    const int64_t mid = low + (high - low + 1) / 2;
    if (peak(mid) <= budget) low = mid;
    else high = mid - 1;
  }
  return low;
}

int64_t MemoryPlan::largest_micro_batch(int64_t budget) const {
  // Without accumulation the gradients are not held: the whole per-rank batch may fit when
  // a smaller, accumulating micro batch's peak would not.
  if (per_rank_batch > 0 && peak(per_rank_batch) <= budget) return per_rank_batch;
  return largest_accumulating_micro_batch(budget);
}

nlohmann::json MemoryPlan::to_json(int64_t budget) const {
  nlohmann::json j = {{"weights", weights},
                      {"gradients", gradients},
                      {"optimizer", optimizer},
                      {"amp_copies", amp_copies},
                      {"workspace", workspace},
                      {"gradient_buckets", gradient_buckets},
                      {"reference", reference},
                      {"reference_per_sequence", reference_per_sequence},
                      {"lm_head_gradient", lm_head_gradient},
                      {"embedding_gradient", embedding_gradient},
                      {"loss_workspace", loss_workspace},
                      {"activations_per_sequence", activations_per_sequence},
                      {"activations_per_sequence_no_checkpointing", activations_per_sequence_no_checkpointing},
                      {"activations_per_sequence_all_checkpointed", activations_per_sequence_all_checkpointed},
                      {"logits_per_sequence", logits_per_sequence},
                      {"backward_per_sequence", backward_per_sequence},
                      {"first_recompute_gradients", first_recompute_gradients},
                      {"first_recompute_per_sequence", first_recompute_per_sequence},
                      {"host_bytes", host_bytes},
                      {"fixed", fixed()},
                      {"per_sequence", per_sequence()}};
  if (budget > 0) {
    j["budget"] = budget;
    j["largest_micro_batch"] = largest_micro_batch(budget);
    j["largest_accumulating_micro_batch"] = largest_accumulating_micro_batch(budget);
  }
  return j;
}

int64_t parse_memory_size(const std::string& text, const std::string& where) {
  size_t pos = 0;
  double value = 0;
  try {
    value = std::stod(text, &pos);
  } catch (const std::exception&) {
    throw Error(where + ": expected a size such as 80GiB or 24GB, got \"" + text + "\"");
  }
  std::string unit = text.substr(pos);
  for (auto& ch : unit) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  double scale = 1;
  if (unit == "" || unit == "b") scale = 1;
  else if (unit == "kib") scale = 1024.0;
  else if (unit == "mib") scale = 1024.0 * 1024;
  else if (unit == "gib" || unit == "g") scale = 1024.0 * 1024 * 1024;
  else if (unit == "kb") scale = 1e3;
  else if (unit == "mb") scale = 1e6;
  else if (unit == "gb") scale = 1e9;
  else throw Error(where + ": unknown unit \"" + unit + "\" in \"" + text + "\" (use B, KiB, MiB, GiB, KB, MB or GB)");
  if (!(value > 0)) throw Error(where + ": expected a positive size, got \"" + text + "\"");
  // Bounded before the conversion (a double beyond int64's range, or inf, converts undefined).
  constexpr double kMaxBytes = 1ll << 50;  // 1 PiB: no device has that much
  if (!(value * scale <= kMaxBytes)) throw Error(where + ": \"" + text + "\" is more than 1 PiB; give a real size");
  if (value * scale < 1) throw Error(where + ": \"" + text + "\" is less than one byte; give a real size");
  return static_cast<int64_t>(value * scale);
}

}  // namespace gpt2ft
