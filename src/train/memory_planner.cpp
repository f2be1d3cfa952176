// Memory planner. Per token and block (C channels, I MLP width, NH heads), our forward pass
// keeps for backward, with autocast to a 16-bit type (b = 2 bytes) or without (b = 4):
//   ln_1 and ln_2 inputs (the float32 residual stream)          2 x 4C
//   the matmul inputs: ln_1 and ln_2 outputs (cast to b)        2 x bC
//   q, k, v and the attention output (SDPA)                     4 x bC
//   the attention output made contiguous for c_proj             bC
//   c_fc output (for the activation) and its result (c_proj)    2 x bI
//   dropout masks (1 byte each) when dropout is on              2C (+ attention's NH*T on the math path)
// On the CPU (or with dropout, where SDPA falls back to the math path) attention also keeps
// its probabilities: NH*T floats per token, twice with dropout. A checkpointed block keeps
// only its float32 input (4C); one block is recomputed at a time in backward, adding one
// block's activations. The logits are (T, V) per sequence: in b, a float32 copy for the loss,
// log-softmax saved by cross-entropy and its gradient: (b + 12) V bytes per token.
// The chunked loss (train.chunked_loss) instead keeps one chunk of logits (R rows: b bytes, a
// float32 copy, their gradient in b; 4 bytes in all without autocast), d lm_head weight in
// float32 (4VC) and d hidden in float32 (4C per token) from forward to backward.
// ZeRO-1 (shard_optimizer) keeps the optimizer state of the rank that owns the most elements.
// Data parallel (world_size > 1) adds the gradient buckets: one float32 copy of the trained
// parameters' gradients, per GPU.
#include "gpt2ft/train/memory_planner.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <functional>
#include <numeric>

#include "gpt2ft/core/error.h"
#include "gpt2ft/dist/optimizer_shards.h"
#include "gpt2ft/model/finetune.h"

namespace gpt2ft {

MemoryPlan plan_memory(const MemoryPlanInput& in) {
  const GPT2Config& c = in.model;
  const int64_t P = c.num_parameters();
  // The trained tensors' element counts, in the model's order (freezing as model/finetune does).
  std::vector<int64_t> trained_numels;
  for (const auto& [name, shape] : c.parameter_shapes()) {
    if (is_frozen(name, in.freeze_embeddings, in.freeze_blocks)) continue;
    trained_numels.push_back(std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>()));
  }
  const int64_t trained = std::accumulate(trained_numels.begin(), trained_numels.end(), int64_t{0});
  const int64_t tensors = static_cast<int64_t>(trained_numels.size());
  const int64_t b = in.amp == c10::kFloat ? 4 : 2;
  const int64_t C = c.n_embd, I = c.inner_dim(), T = in.seq_len, L = c.n_layer, V = c.vocab_size;

  MemoryPlan m;
  m.weights = 4 * P;
  m.gradients = 4 * trained;
  m.optimizer = 8 * trained + 4 * tensors;  // two moments per element, a float32 step per tensor
  if (in.shard_optimizer && in.world_size > 1) {
    // ZeRO-1: the most loaded rank's share, under the partition the trainer uses.
    const std::vector<int> owner = partition_parameters(trained_numels, static_cast<int>(in.world_size));
    std::vector<int64_t> bytes(static_cast<size_t>(in.world_size), 0);
    for (size_t i = 0; i < owner.size(); ++i) bytes[static_cast<size_t>(owner[i])] += 8 * trained_numels[i] + 4;
    m.optimizer = *std::max_element(bytes.begin(), bytes.end());
  }
  if (b == 2) {
    // Autocast caches 16-bit copies of the matmul weights (blocks and the tied lm_head).
    const int64_t matmul_params = L * (C * 3 * C + C * C + 2 * C * I) + V * C;
    m.amp_copies = 2 * matmul_params;
  }
  m.workspace = in.cuda ? (512ll << 20) : 0;
  m.gradient_buckets = in.world_size > 1 ? 4 * trained : 0;

  int64_t per_token_block = 2 * 4 * C + 2 * b * C + 4 * b * C + b * C + 2 * b * I;
  if (in.dropout) per_token_block += 2 * C;
  const bool math_attention = !in.cuda || in.dropout;
  if (math_attention) per_token_block += (in.dropout ? 2 : 1) * c.n_head * T * 4;
  const int64_t block = per_token_block * T;  // per sequence
  const int64_t embedding = 4 * C * T + (in.dropout ? C * T : 0);
  const int64_t final_norm = 4 * C * T + b * C * T;
  m.activations_per_sequence_no_checkpointing = embedding + L * block + final_norm;
  m.activations_per_sequence_all_checkpointed = embedding + L * 4 * C * T + block + final_norm;
  if (in.checkpoint_every <= 0) {
    m.activations_per_sequence = m.activations_per_sequence_no_checkpointing;
  } else {
    const int64_t checkpointed = (L + in.checkpoint_every - 1) / in.checkpoint_every;
    m.activations_per_sequence = embedding + (L - checkpointed) * block + checkpointed * 4 * C * T + block + final_norm;
  }
  if (in.chunked_loss) {
    const int64_t rows = std::max<int64_t>(1, (64ll << 20) / (4 * V));  // as linear_cross_entropy picks
    m.loss_workspace = rows * V * (b == 4 ? 4 : 4 + 2 * b) + 4 * V * C;
    m.logits_per_sequence = 4 * C * T;
  } else {
    m.logits_per_sequence = (b + 12) * V * T;
  }
  return m;
}

int64_t MemoryPlan::largest_micro_batch(int64_t budget) const {
  if (per_sequence() <= 0 || budget < fixed()) return 0;
  return (budget - fixed()) / per_sequence();
}

nlohmann::json MemoryPlan::to_json(int64_t budget) const {
  nlohmann::json j = {{"weights", weights},
                      {"gradients", gradients},
                      {"optimizer", optimizer},
                      {"amp_copies", amp_copies},
                      {"workspace", workspace},
                      {"gradient_buckets", gradient_buckets},
                      {"loss_workspace", loss_workspace},
                      {"activations_per_sequence", activations_per_sequence},
                      {"activations_per_sequence_no_checkpointing", activations_per_sequence_no_checkpointing},
                      {"activations_per_sequence_all_checkpointed", activations_per_sequence_all_checkpointed},
                      {"logits_per_sequence", logits_per_sequence},
                      {"fixed", fixed()}};
  if (budget > 0) {
    j["budget"] = budget;
    j["largest_micro_batch"] = largest_micro_batch(budget);
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
  return static_cast<int64_t>(value * scale);
}

}  // namespace gpt2ft
