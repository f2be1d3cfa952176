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
//   only an RNG offset)                                                              2 x C
// On the CPU with dropout SDPA takes the math path, which also keeps the attention
// probabilities and their dropout mask: about 2 x 4 NH T more.
// A checkpointed block keeps only its input (4C). The final layer norm keeps the last
// block's output (4C + 8). The embedding's dropout keeps a mask (C).
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
// of host memory instead of 8 on the GPU.
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
// the trained gradients, per GPU. cuBLAS keeps a 32 MiB workspace on the default stream
// (Hopper's default size; smaller GPUs use less).
#include "gpt2ft/memory/planner.h"

#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/optim/adamw_8bit.h"

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

MemoryPlan plan_memory(const MemoryPlanInput& in) {
  const GPT2Config& c = in.model;
  const int64_t P = c.num_parameters();
  // The trained tensors' element counts, in the model's order (freezing as model/finetune
  // does; with LoRA the adapters, A (r, in) and B (out, r) on each targeted projection).
  std::vector<int64_t> trained_numels;
  int64_t lora_extra_per_token = 0;  // the adapters' own activations, per token
  const int64_t b_act = in.amp == c10::kFloat ? 4 : 2;
  for (const auto& [name, shape] : c.parameter_shapes()) {
    const int64_t numel = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
    if (in.lora_rank > 0) {
      const std::string module = name.substr(0, name.rfind('.'));
      if (shape.size() == 2 && ends_with(name, ".weight") &&
          module.find(".h.") != std::string::npos && lora_targets(module, in.lora_targets)) {
        const int64_t out = shape[0], inner = shape[1];
        trained_numels.push_back(in.lora_rank * inner);  // A
        trained_numels.push_back(out * in.lora_rank);    // B
        lora_extra_per_token += b_act * in.lora_rank + (in.lora_dropout ? inner * (b_act + 1) : 0);
      }
      continue;
    }
    if (!is_frozen(name, in.freeze_embeddings, in.freeze_blocks)) trained_numels.push_back(numel);
  }
  const int64_t trained = std::accumulate(trained_numels.begin(), trained_numels.end(), int64_t{0});
  const int64_t b = in.amp == c10::kFloat ? 4 : 2;
  const int64_t C = c.n_embd, I = c.inner_dim(), T = in.seq_len, L = c.n_layer, V = c.vocab_size, NH = c.n_head;
  const int64_t checkpointed = in.checkpoint_every <= 0 ? 0 : (L + in.checkpoint_every - 1) / in.checkpoint_every;
  const bool lora = in.lora_rank > 0;
  const bool lm_head_trained = !lora && (!c.tie_word_embeddings || !in.freeze_embeddings);
  const bool wte_trained = !lora && !in.freeze_embeddings;

  MemoryPlan m;
  m.tokens_per_sequence = T;
  m.per_rank_batch = in.global_batch > 0 ? in.global_batch / std::max<int64_t>(1, in.world_size) : 0;
  m.weights = lora ? in.base_bytes * P + 4 * trained : 4 * P;
  m.gradients = 4 * trained;
  // Two moments per element and a float32 step per tensor; 8-bit: codes and block scales for
  // tensors torchao quantizes, float32 moments for the others.
  const auto state_bytes = [&](int64_t numel) {
    return in.optimizer_8bit ? adamw_8bit_state_bytes(numel) : 8 * numel + 4;
  };
  m.optimizer = 0;
  for (const int64_t numel : trained_numels) m.optimizer += state_bytes(numel);
  int64_t owned = trained;  // trained elements whose optimizer state this rank keeps
  if (in.shard_optimizer && in.world_size > 1) {
    // ZeRO-1: the most loaded rank's share, under the partition the trainer uses.
    const std::vector<int> owner = partition_parameters(trained_numels, static_cast<int>(in.world_size));
    std::vector<int64_t> bytes(static_cast<size_t>(in.world_size), 0), elements(bytes.size(), 0);
    for (size_t i = 0; i < owner.size(); ++i) {
      bytes[static_cast<size_t>(owner[i])] += state_bytes(trained_numels[i]);
      elements[static_cast<size_t>(owner[i])] += trained_numels[i];
    }
    m.optimizer = *std::max_element(bytes.begin(), bytes.end());
    owned = *std::max_element(elements.begin(), elements.end());
  }
  if (in.optimizer_offload) {  // the state moves to the host, with a weights' copy and a gradient buffer
    m.host_bytes = 8 * owned + (in.optimizer_8bit ? m.optimizer : 8 * owned);  // weights' copy, gradients, state
    m.optimizer = 0;
  }
  if (b == 2 && !(lora && in.base_bytes == 2)) {  // a 16-bit base needs no casts
    const int64_t block_matmul_params = C * 3 * C + 3 * C + C * C + C + C * I + I + I * C + C;  // weights and biases
    m.amp_copies = 2 * block_matmul_params * ((L - checkpointed) + (checkpointed > 0 ? 1 : 0));
    if (!in.chunked_loss) m.amp_copies += 2 * V * C;  // the eager lm_head's cast, saved by its matmul
  }
  m.workspace = in.cuda ? (32ll << 20) : 0;
  if (in.optimizer_8bit && !in.optimizer_offload && in.cuda && !trained_numels.empty()) {
    // The 8-bit step's float32 temporaries on CUDA (the ATen ops, every tensor in pieces) for one
    // piece of at most 2^22 values (dequantized moments, their squares and quotients, the
    // updated weights: ~8 copies). The CPU's fused kernel allocates no tensor.
    m.workspace += 8 * 4 * std::min<int64_t>(int64_t{1} << 22, *std::max_element(trained_numels.begin(), trained_numels.end()));
  }
  m.gradient_buckets = in.world_size > 1 ? 4 * trained : 0;
  m.lm_head_gradient = lm_head_trained ? 4 * V * C : 0;
  m.embedding_gradient = wte_trained ? 4 * V * C : 0;

  // Activations per token.
  int64_t block = 2 * 4 * C + 2 * 8 + 2 * b * C + 3 * b * C + b * C + 4 * NH + 2 * b * I;
  if (in.dropout) block += 2 * C;
  if (!in.cuda && in.dropout) block += 2 * 4 * NH * T;
  const int64_t kept_input = 4 * C;
  const int64_t outside = 4 * C + 8 + (in.dropout ? C : 0);  // final norm's input, embedding dropout mask
  m.activations_per_sequence_no_checkpointing = T * (L * block + outside);
  m.activations_per_sequence_all_checkpointed = T * (L * kept_input + outside);
  m.activations_per_sequence = T * ((L - checkpointed) * block + checkpointed * kept_input + outside) +
                               T * lora_extra_per_token * (L - checkpointed) / std::max<int64_t>(1, L);
  if (in.packed_documents) {
    const int64_t packing = b * T * document_mask_row(T) + 8 * (3 * T - (T + 1));
    m.activations_per_sequence += packing;
    m.activations_per_sequence_no_checkpointing += packing;
    m.activations_per_sequence_all_checkpointed += packing;
  }
  if (in.chunked_loss) {
    const int64_t rows = linear_cross_entropy_chunk_rows(V, in.cuda);
    const bool head_cast = b == 2 && !(lora && in.base_bytes == 2);  // a 16-bit head is used as it is
    m.loss_chunk_rows = rows;
    m.loss_bytes_per_row = V * (b == 4 ? 4 : 4 + b) + C * b;
    m.loss_workspace = rows * m.loss_bytes_per_row + (head_cast ? 2 * V * C : 0) + m.lm_head_gradient;
    m.logits_per_sequence = 4 * C * T;
  } else {
    m.loss_workspace = 0;
    m.lm_head_gradient = 0;  // formed in backward, like every other gradient
    m.logits_per_sequence = (b + 12) * V * T;
  }
  const int64_t transient = 4 * C + 2 * b * I + b * C;  // d residual + a block's gradients
  m.backward_per_sequence = T * (transient + (checkpointed > 0 ? block : 0));
  m.residual_gradient_per_sequence = T * 4 * C;
  return m;
}

int64_t MemoryPlan::loss_workspace_at(int64_t mb) const {
  if (loss_chunk_rows <= 0 || tokens_per_sequence <= 0) return loss_workspace;
  const int64_t rows = std::min(loss_chunk_rows, mb * tokens_per_sequence);  // a chunk never exceeds the rows there are
  return loss_workspace - (loss_chunk_rows - rows) * loss_bytes_per_row;
}

int64_t MemoryPlan::forward_peak(int64_t mb) const {
  return resident() + held_gradients(mb) + loss_workspace_at(mb) + mb * (activations_per_sequence + logits_per_sequence);
}

int64_t MemoryPlan::backward_peak(int64_t mb) const {
  return resident() + held_gradients(mb) + lm_head_gradient +
         mb * (activations_per_sequence + logits_per_sequence + backward_per_sequence);
}

int64_t MemoryPlan::backward_end_peak(int64_t mb) const {
  return resident() + gradients + lm_head_gradient + embedding_gradient + mb * residual_gradient_per_sequence;
}

int64_t MemoryPlan::peak(int64_t mb) const {
  return std::max({forward_peak(mb), backward_peak(mb), backward_end_peak(mb)});
}

int64_t MemoryPlan::fixed() const { return resident() + gradients + lm_head_gradient; }

int64_t MemoryPlan::per_sequence() const {
  return activations_per_sequence + logits_per_sequence + backward_per_sequence;
}

int64_t MemoryPlan::largest_accumulating_micro_batch(int64_t budget) const {
  // The largest m with every phase (with held gradients) under the budget: each phase is a
  // line a + m * s.
  auto largest_under = [&](int64_t a, int64_t s) -> int64_t {
    if (budget < a) return 0;
    return s <= 0 ? std::numeric_limits<int64_t>::max() : (budget - a) / s;
  };
  const int64_t act = activations_per_sequence + logits_per_sequence;
  const int64_t fits = std::min({largest_under(resident() + gradients + loss_workspace, act),
                                 largest_under(resident() + gradients + lm_head_gradient, act + backward_per_sequence),
                                 largest_under(resident() + gradients + lm_head_gradient + embedding_gradient,
                                               residual_gradient_per_sequence)});
  return per_rank_batch > 0 ? std::min(fits, per_rank_batch - 1) : fits;
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
                      {"lm_head_gradient", lm_head_gradient},
                      {"embedding_gradient", embedding_gradient},
                      {"loss_workspace", loss_workspace},
                      {"activations_per_sequence", activations_per_sequence},
                      {"activations_per_sequence_no_checkpointing", activations_per_sequence_no_checkpointing},
                      {"activations_per_sequence_all_checkpointed", activations_per_sequence_all_checkpointed},
                      {"logits_per_sequence", logits_per_sequence},
                      {"backward_per_sequence", backward_per_sequence},
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
  return static_cast<int64_t>(value * scale);
}

}  // namespace gpt2ft
