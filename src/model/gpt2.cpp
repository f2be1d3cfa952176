// GPT-2 forward pass. See the header for the shape legend.
#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/model/linear_cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <limits>
#include <torch/nn/functional.h>

#include "gpt2ft/core/host_memory.h"
#include "gpt2ft/data/samples.h"
#include "gpt2ft/memory/counting_allocator.h"
#include "gpt2ft/model/activation_checkpoint.h"
#include "gpt2ft/model/packed_attention.h"

namespace gpt2ft {
namespace F = torch::nn::functional;
namespace {

torch::nn::Linear make_linear(int64_t in, int64_t out, Weights weights) {
  if (weights == Weights::kPlaceholders) in = out = 1;  // forward reads only the tensors, never the options
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(true));
}

torch::nn::Embedding make_embedding(int64_t rows, int64_t dim, Weights weights) {
  if (weights == Weights::kPlaceholders) rows = dim = 1;
  return torch::nn::Embedding(rows, dim);
}

torch::nn::LayerNorm make_layer_norm(const GPT2Config& c) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.n_embd}).eps(c.layer_norm_epsilon));
}

torch::Tensor maybe_dropout(const torch::Tensor& x, double p, bool training) {
  if (!training || p == 0.0) return x;
  return torch::dropout(x, p, /*train=*/true);
}

torch::Tensor activate(const torch::Tensor& x, Activation a) {
  switch (a) {
    case Activation::kGeluNew: return torch::gelu(x, "tanh");
    case Activation::kGelu: return torch::gelu(x);
    case Activation::kRelu: return torch::relu(x);
    case Activation::kSilu: return torch::silu(x);
    case Activation::kQuickGelu: return x * torch::sigmoid(1.702 * x);
    case Activation::kTanh: return torch::tanh(x);
  }
  return x;
}

}  // namespace

torch::Tensor project(torch::nn::Linear& base, LoraAdapter& lora, const torch::Tensor& x, bool training) {
  torch::Tensor y = base(x);
  if (!lora.active() || !lora.enabled) return y;
  return y + lora.B(lora.A(maybe_dropout(x, lora.dropout, training))) * lora.scaling;
}

AttentionImpl::AttentionImpl(const GPT2Config& c, Weights weights)
    : n_head_(c.n_head), attn_pdrop_(c.attn_pdrop), resid_pdrop_(c.resid_pdrop) {
  c_attn = register_module("c_attn", make_linear(c.n_embd, 3 * c.n_embd, weights));
  c_proj = register_module("c_proj", make_linear(c.n_embd, c.n_embd, weights));
}

int64_t document_mask_row(int64_t T) { return (T + 15) / 16 * 16; }

torch::Tensor document_attention_mask(const torch::Tensor& positions, c10::ScalarType dtype) {
  const int64_t B = positions.size(0), T = positions.size(1);
  const torch::Tensor document = positions.eq(0).cumsum(1);  // (B, T) the document of each token
  const torch::Tensor causal = torch::ones({T, T}, positions.options().dtype(torch::kBool)).tril();  // (T, T)
  const torch::Tensor allowed = document.unsqueeze(2).eq(document.unsqueeze(1)).logical_and_(causal);  // (B, T, T)
  return torch::zeros({B, 1, T, document_mask_row(T)}, positions.options().dtype(dtype))
      .narrow(3, 0, T)  // (B, 1, T, T), rows 16 values apart
      .masked_fill_(allowed.logical_not().unsqueeze(1), -std::numeric_limits<double>::infinity());
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const DocumentAttention& docs) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const int64_t NH = n_head_, HD = C / NH;
  auto qkv = project(c_attn, c_attn_lora, x, is_training()).split(C, /*dim=*/2);  // 3 x (B, T, C)
  auto heads = [&](const torch::Tensor& t) {                 // (B, T, C) -> (B, NH, T, HD)
    return t.view({B, T, NH, HD}).transpose(1, 2);
  };
  torch::Tensor y = attend(heads(qkv[0]), heads(qkv[1]), heads(qkv[2]), docs, is_training() ? attn_pdrop_ : 0.0);  // (B, NH, T, HD)
  y = y.transpose(1, 2).contiguous().view({B, T, C});          // (B, T, C)
  return maybe_dropout(project(c_proj, c_proj_lora, y, is_training()), resid_pdrop_, is_training());
}

torch::Tensor AttentionImpl::forward_cached(const torch::Tensor& x, torch::Tensor& k_cache, torch::Tensor& v_cache,
                                           int64_t pos) {
  const int64_t B = x.size(0), t = x.size(1), C = x.size(2);
  const int64_t NH = n_head_, HD = C / NH;
  TORCH_CHECK(t == 1 || pos == 0, "forward_cached: several new tokens must start at position 0");
  auto qkv = project(c_attn, c_attn_lora, x, false).split(C, /*dim=*/2);  // 3 x (B, t, C)
  auto heads = [&](const torch::Tensor& u) { return u.view({B, t, NH, HD}).transpose(1, 2); };  // (B, NH, t, HD)
  k_cache.narrow(2, pos, t).copy_(heads(qkv[1]));
  v_cache.narrow(2, pos, t).copy_(heads(qkv[2]));
  torch::Tensor y = at::scaled_dot_product_attention(heads(qkv[0]), k_cache.narrow(2, 0, pos + t),
                                                     v_cache.narrow(2, 0, pos + t), /*attn_mask=*/{}, 0.0,
                                                     /*is_causal=*/t > 1);  // (B, NH, t, HD)
  return project(c_proj, c_proj_lora, y.transpose(1, 2).contiguous().view({B, t, C}), false);
}

MLPImpl::MLPImpl(const GPT2Config& c, Weights weights) : activation_(c.activation()), resid_pdrop_(c.resid_pdrop) {
  c_fc = register_module("c_fc", make_linear(c.n_embd, c.inner_dim(), weights));
  c_proj = register_module("c_proj", make_linear(c.inner_dim(), c.n_embd, weights));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) {
  torch::Tensor h = activate(project(c_fc, c_fc_lora, x, is_training()), activation_);  // (B, T, I)
  return maybe_dropout(project(c_proj, c_proj_lora, h, is_training()), resid_pdrop_, is_training());  // (B, T, C)
}

BlockImpl::BlockImpl(const GPT2Config& c, Weights weights) {
  ln_1 = register_module("ln_1", make_layer_norm(c));
  attn = register_module("attn", Attention(c, weights));
  ln_2 = register_module("ln_2", make_layer_norm(c));
  mlp = register_module("mlp", MLP(c, weights));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, const DocumentAttention& docs) {
  torch::Tensor h = x + attn->forward(ln_1(x), docs);  // (B, T, C)
  return h + mlp(ln_2(h));             // (B, T, C)
}

torch::Tensor BlockImpl::forward_cached(const torch::Tensor& x, torch::Tensor& k_cache, torch::Tensor& v_cache,
                                       int64_t pos) {
  torch::Tensor h = x + attn->forward_cached(ln_1(x), k_cache, v_cache, pos);  // (B, t, C)
  return h + mlp(ln_2(h));
}

TransformerImpl::TransformerImpl(const GPT2Config& c, Weights weights) {
  wte = register_module("wte", make_embedding(c.vocab_size, c.n_embd, weights));
  wpe = register_module("wpe", make_embedding(c.n_positions, c.n_embd, weights));
  h = register_module("h", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.n_layer; ++i) h->push_back(Block(c, weights));
  ln_f = register_module("ln_f", make_layer_norm(c));
}

GPT2Impl::GPT2Impl(const GPT2Config& config, Weights weights) : config_(config) {
  config_.validate("model config");
  if (weights == Weights::kInitialised) {
    require_host_memory(config_.weight_bytes(),
                        "a model of " + std::to_string(config_.n_layer) + " layers, " + std::to_string(config_.n_embd) +
                            " channels and vocabulary " + std::to_string(config_.vocab_size),
                        "check config.json (a damaged size?) or use a host with more memory");
  }
  transformer = register_module("transformer", Transformer(config_, weights));
  if (!config_.tie_word_embeddings) {
    const bool placeholder = weights == Weights::kPlaceholders;
    lm_head = register_module("lm_head", torch::nn::Linear(torch::nn::LinearOptions(placeholder ? 1 : config_.n_embd,
                                                                                    placeholder ? 1 : config_.vocab_size)
                                                               .bias(false)));
  }
}

torch::Tensor GPT2Impl::lm_head_weight() const {
  if (use_kept_) return config_.tie_word_embeddings ? kept_.wte : kept_.lm_head;
  return config_.tie_word_embeddings ? transformer->wte->weight : lm_head->weight;
}

torch::Tensor GPT2Impl::embed_tokens(const torch::Tensor& idx) {
  return use_kept_ ? torch::embedding(kept_.wte, idx) : transformer->wte(idx);  // (B, T) -> (B, T, C)
}

void GPT2Impl::keep_embeddings() {
  torch::NoGradGuard no_grad;
  kept_.wte = transformer->wte->weight.detach().to(torch::kCPU, /*non_blocking=*/false, /*copy=*/true);
  if (!config_.tie_word_embeddings) kept_.lm_head = lm_head->weight.detach().to(torch::kCPU, false, true);
}

void GPT2Impl::use_kept_embeddings(bool on) {
  TORCH_CHECK(!on || has_kept_embeddings(), "use_kept_embeddings: no embeddings were kept");
  const c10::Device device = transformer->wte->weight.device();
  if (on && kept_.wte.device() != device) {  // once: the host copy moves to the model's device
    kept_.wte = kept_.wte.to(device);
    if (kept_.lm_head.defined()) kept_.lm_head = kept_.lm_head.to(device);
  }
  use_kept_ = on;
}

torch::Tensor GPT2Impl::forward_hidden(const torch::Tensor& idx, const torch::Tensor& positions,
                                       const SequenceBounds& bounds) {
  const int64_t T = idx.size(1);
  TORCH_CHECK(T <= config_.n_positions, "sequence length ", T, " exceeds n_positions ",
              config_.n_positions);
  DocumentAttention docs;  // packed documents; none: causal
  torch::Tensor pos = torch::arange(T, idx.options().dtype(torch::kLong));  // (T)
  if (positions.defined()) {
    TORCH_CHECK(positions.sizes() == idx.sizes(), "positions ", positions.sizes(), " do not match the tokens ", idx.sizes());
    pos = positions;  // (B, T)
    const auto device = idx.device().type();
    docs = document_attention(positions, packed_attention_,
                              at::autocast::is_autocast_enabled(device) ? at::autocast::get_autocast_dtype(device)
                                                                        : transformer->wte->weight.scalar_type(),
                              bounds);
  }
  torch::Tensor x = embed_tokens(idx) + transformer->wpe(pos);  // (B, T, C)
  x = maybe_dropout(x, config_.embd_pdrop, is_training());
  const bool checkpoint = checkpoint_every_ > 0 && is_training() && torch::GradMode::is_enabled();
  for (size_t i = 0; i < transformer->h->size(); ++i) {
    BlockImpl& b = *transformer->h[i]->as<Block>();
    const bool recompute = checkpoint && static_cast<int64_t>(i) % checkpoint_every_ == 0;
    x = recompute ? checkpointed_block_forward(b, x, docs) : b.forward(x, docs);  // (B, T, C)
  }
  return transformer->ln_f(x);  // (B, T, C)
}

torch::Tensor GPT2Impl::forward(const torch::Tensor& idx, const torch::Tensor& positions, const SequenceBounds& bounds) {
  return torch::linear(forward_hidden(idx, positions, bounds), lm_head_weight());  // (B, T, V)
}

torch::Tensor GPT2Impl::forward_loss(const torch::Tensor& idx, const torch::Tensor& targets, const LossTargets& which) {
  const torch::Tensor h = forward_hidden(idx, which.positions, which.bounds);  // (B, T, C)
  torch::Tensor rows = h.reshape({-1, h.size(-1)});               // (B*T, C)
  torch::Tensor wanted = targets.reshape({-1});                   // (B*T)
  if (which.target_rows.defined()) {  // only the targets reach the output projection
    rows = rows.index_select(0, which.target_rows);      // (K, C)
    wanted = wanted.index_select(0, which.target_rows);  // (K)
  }
  MemoryPhaseScope phase(MemoryPhase::kLoss);
  return linear_cross_entropy(rows, lm_head_weight(), wanted, /*chunk_rows=*/0, which.divisor);
}

torch::Tensor GPT2Impl::forward_logprobs(const torch::Tensor& idx, const torch::Tensor& targets,
                                         const LossTargets& which, bool chunked) {
  const int64_t B = idx.size(0), T = idx.size(1);
  torch::Tensor rows = which.target_rows.defined() ? which.target_rows
                                                   : torch::arange(B * T, idx.options().dtype(torch::kLong));  // (K)
  const torch::Tensor wanted = targets.reshape({-1}).index_select(0, rows);                                // (K)
  torch::Tensor logprobs;                                                                                  // (K)
  if (chunked) {
    const torch::Tensor h = forward_hidden(idx, which.positions, which.bounds);  // (B, T, C)
    MemoryPhaseScope phase(MemoryPhase::kLoss);
    logprobs = linear_target_logprobs(h.reshape({-1, h.size(-1)}).index_select(0, rows), lm_head_weight(), wanted);
  } else {
    const torch::Tensor logits = forward(idx, which.positions, which.bounds);  // (B, T, V)
    logprobs = torch::log_softmax(logits.reshape({B * T, -1}).index_select(0, rows).to(torch::kFloat), 1)
                   .gather(1, wanted.unsqueeze(1))
                   .squeeze(1);
  }
  // (B): each target's log-prob added to its row.
  return torch::zeros({B}, logprobs.options()).index_add(0, rows.div(T, "floor"), logprobs);
}

KVCache GPT2Impl::make_cache(int64_t batch, int64_t capacity) const {
  KVCache cache;
  const auto options = transformer->wte->weight.options().requires_grad(false);
  for (int64_t i = 0; i < config_.n_layer; ++i) {
    cache.k.push_back(torch::empty({batch, config_.n_head, capacity, config_.head_dim()}, options));
    cache.v.push_back(torch::empty({batch, config_.n_head, capacity, config_.head_dim()}, options));
  }
  return cache;
}

torch::Tensor GPT2Impl::forward_cached(const torch::Tensor& idx, KVCache& cache) {
  const int64_t t = idx.size(1), pos = cache.length;
  TORCH_CHECK(pos + t <= config_.n_positions, "position ", pos + t, " exceeds n_positions ", config_.n_positions);
  torch::Tensor positions = torch::arange(pos, pos + t, idx.options().dtype(torch::kLong));  // (t)
  torch::Tensor x = embed_tokens(idx) + transformer->wpe(positions);  // (B, t, C)
  for (size_t i = 0; i < transformer->h->size(); ++i) {
    x = transformer->h[i]->as<Block>()->forward_cached(x, cache.k[i], cache.v[i], pos);
  }
  cache.length = pos + t;
  return torch::linear(transformer->ln_f(x), lm_head_weight());  // (B, t, V)
}

torch::Tensor next_token_loss(const torch::Tensor& logits, const torch::Tensor& targets, double divisor) {
  const int64_t V = logits.size(-1);
  auto options = F::CrossEntropyFuncOptions().ignore_index(kIgnoreTarget);
  const torch::Tensor z = logits.reshape({-1, V}).to(torch::kFloat);  // (B*T, V)
  if (divisor <= 0) return F::cross_entropy(z, targets.reshape({-1}), options);
  return F::cross_entropy(z, targets.reshape({-1}), options.reduction(torch::kSum)) / divisor;
}

}  // namespace gpt2ft
