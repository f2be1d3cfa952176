// The GPT-2 language model as a torch::nn::Module whose parameter names are Hugging Face's
// (transformer.h.0.attn.c_attn.weight, ...), so loading weights is a plain name map.
//
// Shape legend: B batch, T sequence length, C channels (n_embd), NH heads, HD head size
// (C / NH), I MLP width (n_inner), V vocabulary.
//
// Linear weights are stored (out, in) like torch::nn::Linear; Hugging Face's Conv1D stores
// them (in, out), and io/model_folder.cpp transposes them in one place on load and save.
#pragma once

#include <optional>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include "gpt2ft/model/config.h"
#include "gpt2ft/model/lora_config.h"

namespace gpt2ft {

// A low-rank adapter on one projection (LoRA, as PEFT puts it on GPT-2's Conv1D layers):
// y = base(x) + scaling * B(A(dropout(x))), A (r, in) and B (out, r). Its A and B are
// registered on the base layer as "lora_A" and "lora_B", so their parameters are named
// <layer>.lora_A.weight and <layer>.lora_B.weight (PEFT's names without "base_model.model.").
struct LoraAdapter {
  torch::nn::Linear A{nullptr};  // in -> r
  torch::nn::Linear B{nullptr};  // r -> out
  double scaling = 0;
  double dropout = 0;
  bool enabled = true;  // false: the base alone (a preference reference, AdaptersOff)
  bool active() const { return !A.is_empty(); }
};

// base(x), plus the adapter's term when it has one. x (B, T, in) -> (B, T, out).
torch::Tensor project(torch::nn::Linear& base, LoraAdapter& lora, const torch::Tensor& x, bool training);

enum class PackedAttention { kMask, kVarlen };

// How a model's modules get their weights: initialised (each module's default), or as
// one-element placeholders that the caller replaces, every one, with set_data (a copy of
// another model's weights without allocating and initialising a model only to overwrite it).
// LayerNorms are made whole either way (their shape is part of their forward).
enum class Weights { kInitialised, kPlaceholders };

// Keys and values of earlier positions, per layer, for incremental decoding.
struct KVCache {
  std::vector<torch::Tensor> k, v;  // per layer (B, NH, capacity, HD)
  int64_t length = 0;               // positions filled
};

// Packed documents (data/samples.h): positions (B, T) restart at 0 where each document starts
// -> an additive mask (B, 1, T, T) in `dtype` (attention's compute dtype, so that SDPA uses it
// as it is and every layer shares it): 0 where query t may attend key s (s <= t in t's
// document), -inf elsewhere. Its rows are laid out 16 values apart (the storage is
// (B, 1, T, round_up(T, 16)), narrowed to T), so that CUDA's memory-efficient attention takes
// it as it is instead of copying a misaligned mask in every layer.
torch::Tensor document_attention_mask(const torch::Tensor& positions, c10::ScalarType dtype);
// T rounded up to the mask's row alignment (16).
int64_t document_mask_row(int64_t T);

// How packed documents attend, built once per forward pass (model/packed_attention.h).
// Neither field defined: plain causal attention over each row.
struct DocumentAttention {
  torch::Tensor mask;        // (B, 1, T, T) document_attention_mask (attention.packed "mask")
  torch::Tensor cu_seqlens;  // (D + 1) int32 document starts in the B*T flattened tokens ("varlen", CUDA)
  int64_t max_len = 0;       // the longest of the D documents ("varlen")
  bool packed() const { return mask.defined() || cu_seqlens.defined(); }
};

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const GPT2Config& config, Weights weights = Weights::kInitialised);
  // (B, T, C) -> (B, T, C); causal, or each packed document attending only to itself.
  torch::Tensor forward(const torch::Tensor& x, const DocumentAttention& docs = {});
  // x (B, t, C) at positions pos..pos+t-1, attending to the cached keys/values before them.
  torch::Tensor forward_cached(const torch::Tensor& x, torch::Tensor& k_cache, torch::Tensor& v_cache, int64_t pos);

  torch::nn::Linear c_attn{nullptr};  // C -> 3C (query, key, value)
  torch::nn::Linear c_proj{nullptr};  // C -> C
  LoraAdapter c_attn_lora, c_proj_lora;

 private:
  int64_t n_head_;
  double attn_pdrop_;
  double resid_pdrop_;
};
TORCH_MODULE(Attention);

class MLPImpl : public torch::nn::Module {
 public:
  explicit MLPImpl(const GPT2Config& config, Weights weights = Weights::kInitialised);
  torch::Tensor forward(const torch::Tensor& x);  // (B, T, C) -> (B, T, C)

  torch::nn::Linear c_fc{nullptr};    // C -> I
  torch::nn::Linear c_proj{nullptr};  // I -> C
  LoraAdapter c_fc_lora, c_proj_lora;

 private:
  Activation activation_;
  double resid_pdrop_;
};
TORCH_MODULE(MLP);

class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const GPT2Config& config, Weights weights = Weights::kInitialised);
  torch::Tensor forward(const torch::Tensor& x, const DocumentAttention& docs = {});  // (B, T, C) -> (B, T, C)
  torch::Tensor forward_cached(const torch::Tensor& x, torch::Tensor& k_cache, torch::Tensor& v_cache, int64_t pos);

  torch::nn::LayerNorm ln_1{nullptr};
  Attention attn{nullptr};
  torch::nn::LayerNorm ln_2{nullptr};
  MLP mlp{nullptr};
};
TORCH_MODULE(Block);

// The trunk, registered as "transformer" to match GPT2LMHeadModel.
class TransformerImpl : public torch::nn::Module {
 public:
  explicit TransformerImpl(const GPT2Config& config, Weights weights = Weights::kInitialised);

  torch::nn::Embedding wte{nullptr};  // (V, C) token embeddings
  torch::nn::Embedding wpe{nullptr};  // (n_positions, C) position embeddings
  torch::nn::ModuleList h{nullptr};   // n_layer Blocks
  torch::nn::LayerNorm ln_f{nullptr};
};
TORCH_MODULE(Transformer);

// The token embedding and an untied lm_head's weight, (V, C) each (lm_head undefined when tied).
struct EmbeddingWeights {
  torch::Tensor wte;
  torch::Tensor lm_head;
};

// Packed documents' sequences for variable-length attention, found with the batch on the host
// (data/loader.h, packed_sequence_bounds): (D + 1) int32 starts in the B*T flattened tokens,
// on the device, and the longest. Undefined: found from the positions on the device instead,
// which reads them back to the host (a sync) in every forward pass.
struct SequenceBounds {
  torch::Tensor cu_seqlens;
  int64_t max_len = 0;
};

// What a loss counts beyond plain next-token prediction (every field optional).
struct LossTargets {
  torch::Tensor positions;    // (B, T) int64: packed documents (document_attention_mask)
  torch::Tensor target_rows;  // (K) int64: the rows b*T+t that are targets; undefined: all B*T
  double divisor = 0;         // the loss is the sum over the targets / divisor; 0: their mean
  SequenceBounds bounds;      // packed documents under attention.packed "varlen" (optional)
};

class GPT2Impl : public torch::nn::Module {
 public:
  explicit GPT2Impl(const GPT2Config& config, Weights weights = Weights::kInitialised);

  // idx (B, T) int64 token ids -> final hidden states (B, T, C). With positions (B, T), packed
  // documents: those positions, each document attending only to itself.
  // `bounds`: their sequences for varlen attention, when the loader found them.
  torch::Tensor forward_hidden(const torch::Tensor& idx, const torch::Tensor& positions = {},
                               const SequenceBounds& bounds = {});
  // idx (B, T) -> logits (B, T, V).
  torch::Tensor forward(const torch::Tensor& idx, const torch::Tensor& positions = {}, const SequenceBounds& bounds = {});
  // idx (B, T), targets (B, T) -> next-token loss over the targets `which` selects, the logits
  // computed chunk by chunk and never held for the whole batch (model/linear_cross_entropy.h).
  torch::Tensor forward_loss(const torch::Tensor& idx, const torch::Tensor& targets, const LossTargets& which = {});
  // idx (B, T), targets (B, T) -> (B) float32: each row's summed log-probability of its
  // targets (`which.target_rows`, or every position), chunked like forward_loss. With
  // chunked false, through the eager logits (B, T, V) instead.
  torch::Tensor forward_logprobs(const torch::Tensor& idx, const torch::Tensor& targets, const LossTargets& which,
                                 bool chunked = true);
  // Inference with a KV cache: idx (B, t) are the tokens at positions cache.length.. ; returns
  // their logits (B, t, V) and advances the cache. A multi-token call must start at 0.
  torch::Tensor forward_cached(const torch::Tensor& idx, KVCache& cache);
  KVCache make_cache(int64_t batch, int64_t capacity) const;
  // The output projection's weight (V, C): wte's when tied (the kept ones while in use).
  torch::Tensor lm_head_weight() const;
  // Keeps frozen copies of the embeddings as they are now (on the host), beside the ones that
  // train: LoRA's modules_to_save (model/lora.h), so that the base model stays computable.
  void keep_embeddings();
  bool has_kept_embeddings() const { return kept_.wte.defined(); }
  // While on, the model computes with the kept embeddings (moved to the model's device on first
  // use) instead of its trained ones: AdaptersOff, as PEFT's disable_adapter() returns
  // modules_to_save's original module.
  void use_kept_embeddings(bool on);

  const GPT2Config& config() const { return config_; }
  // Checkpoint every n-th block's activations in training (0 = none, 1 = all).
  void set_activation_checkpointing(int64_t every_n) { checkpoint_every_ = every_n; }
  int64_t activation_checkpointing() const { return checkpoint_every_; }
  // How packed documents attend (attention.packed): the mask (every device), or variable-length
  // flash attention on CUDA under 16-bit autocast (elsewhere the mask is used).
  void set_packed_attention(PackedAttention how) { packed_attention_ = how; }
  PackedAttention packed_attention() const { return packed_attention_; }
  // The settings of its LoRA adapters (model/lora.h), when it has them.
  const std::optional<LoraConfig>& lora() const { return lora_; }
  // Without LoRA, the kept embeddings go too.
  void set_lora(std::optional<LoraConfig> lora) {
    lora_ = std::move(lora);
    if (!lora_) kept_ = {};
  }

  Transformer transformer{nullptr};
  torch::nn::Linear lm_head{nullptr};  // C -> V; registered only when embeddings are untied

 private:
  torch::Tensor embed_tokens(const torch::Tensor& idx);  // (B, T) -> (B, T, C), kept or trained

  GPT2Config config_;
  EmbeddingWeights kept_;  // keep_embeddings(): frozen, never saved or trained
  bool use_kept_ = false;
  int64_t checkpoint_every_ = 0;
  PackedAttention packed_attention_ = PackedAttention::kMask;
  std::optional<LoraConfig> lora_;
};
TORCH_MODULE(GPT2);

// Cross-entropy of logits (B, T, V) against targets (B, T), computed in float32: the mean
// over the targets that are not kIgnoreTarget (-100), or with divisor > 0 their sum / divisor.
torch::Tensor next_token_loss(const torch::Tensor& logits, const torch::Tensor& targets, double divisor = 0);

}  // namespace gpt2ft
