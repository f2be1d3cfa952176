// Attention over packed documents. See the header for the paths and why.
#include "gpt2ft/model/packed_attention.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/SDPBackend.h>

#include <fmt/format.h>

namespace gpt2ft {
namespace {

bool varlen_possible(c10::Device device, c10::ScalarType dtype) {
  return device.is_cuda() && (dtype == c10::kBFloat16 || dtype == c10::kHalf);
}

// q, k, v (B, NH, T, HD) -> (B, NH, T, HD) by flash attention over the documents' tokens.
torch::Tensor varlen_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const DocumentAttention& docs, double dropout_p) {
  const int64_t B = q.size(0), NH = q.size(1), T = q.size(2), HD = q.size(3);
  auto tokens = [&](const torch::Tensor& t) {  // (B, NH, T, HD) -> (B*T, NH, HD)
    return t.transpose(1, 2).reshape({B * T, NH, HD});
  };
  const auto out = at::_flash_attention_forward(tokens(q), tokens(k), tokens(v), docs.cu_seqlens, docs.cu_seqlens,
                                                docs.max_len, docs.max_len, dropout_p, /*is_causal=*/true,
                                                /*return_debug_mask=*/false);
  return std::get<0>(out).view({B, T, NH, HD}).transpose(1, 2);  // (B, NH, T, HD)
}

std::string backend_name(int64_t backend) {
  switch (static_cast<at::SDPBackend>(backend)) {
    case at::SDPBackend::math: return "math (unfused)";
    case at::SDPBackend::flash_attention: return "flash attention";
    case at::SDPBackend::efficient_attention: return "memory-efficient attention";
    case at::SDPBackend::cudnn_attention: return "cuDNN attention";
    case at::SDPBackend::overrideable: return "an overrideable backend";
    case at::SDPBackend::error: break;
  }
  return "none (error)";
}

}  // namespace

CudnnAttentionOff::CudnnAttentionOff(c10::Device device) {
  if (!device.is_cuda() || !at::globalContext().userEnabledCuDNNSDP()) return;
  at::globalContext().setSDPUseCuDNN(false);
  switched_ = true;
}

CudnnAttentionOff::~CudnnAttentionOff() {
  if (switched_) at::globalContext().setSDPUseCuDNN(true);
}

DocumentAttention document_attention(const torch::Tensor& positions, PackedAttention how, c10::ScalarType dtype,
                                     const SequenceBounds& bounds) {
  DocumentAttention docs;
  if (how == PackedAttention::kVarlen && varlen_possible(positions.device(), dtype)) {
    if (bounds.cu_seqlens.defined()) {  // found by the loader on the host: no sync here
      docs.cu_seqlens = bounds.cu_seqlens;
      docs.max_len = bounds.max_len;
      return docs;
    }
    const int64_t n = positions.numel();
    const torch::Tensor starts = positions.reshape({-1}).eq(0).nonzero().squeeze(1);  // (D) int64, one host sync
    const torch::Tensor bounds = torch::cat({starts, torch::full({1}, n, starts.options())});  // (D + 1)
    docs.cu_seqlens = bounds.to(torch::kInt);
    docs.max_len = (bounds.narrow(0, 1, bounds.size(0) - 1) - bounds.narrow(0, 0, bounds.size(0) - 1)).max().item<int64_t>();
    return docs;
  }
  docs.mask = document_attention_mask(positions, dtype);  // (B, 1, T, T)
  return docs;
}

torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const DocumentAttention& docs, double dropout_p) {
  if (docs.cu_seqlens.defined()) return varlen_attention(q, k, v, docs, dropout_p);
  if (!docs.mask.defined()) {
    return at::scaled_dot_product_attention(q, k, v, std::nullopt, dropout_p, /*is_causal=*/true);  // (B, NH, T, HD)
  }
  CudnnAttentionOff no_cudnn(q.device());
  return at::scaled_dot_product_attention(q, k, v, docs.mask, dropout_p, /*is_causal=*/false);  // (B, NH, T, HD)
}

std::string sdpa_backend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& mask, double dropout_p, bool is_causal) {
  const std::optional<at::Tensor> m = mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt;
  return backend_name(at::_fused_sdp_choice(q, k, v, m, dropout_p, is_causal));
}

std::string describe_attention_kernels(const GPT2Config& config, c10::Device device, c10::ScalarType dtype,
                                       int64_t T, double dropout_p, PackedAttention how) {
  // q requires grad, as in training: SDPA's choice depends on it (some kernels have no backward
  // for some inputs). Nothing is computed, so no graph is built.
  torch::AutoGradMode grad_on(true);
  const auto options = torch::TensorOptions().device(device).dtype(dtype);
  const torch::Tensor q = torch::zeros({1, config.n_head, T, config.head_dim()}, options.requires_grad(true));  // (1, NH, T, HD)
  const std::string causal = sdpa_backend(q, q, q, {}, dropout_p, true);
  std::string packed;
  if (how == PackedAttention::kVarlen && varlen_possible(device, dtype)) {
    packed = "flash attention over variable-length documents (attention.packed \"varlen\")";
  } else {
    const torch::Tensor mask = document_attention_mask(torch::zeros({1, T}, options.dtype(torch::kLong)), dtype);  // (1, 1, T, T)
    CudnnAttentionOff no_cudnn(device);
    packed = sdpa_backend(q, q, q, mask, dropout_p, false) + " with the document mask" +
             (how == PackedAttention::kVarlen ? " (attention.packed \"varlen\" needs CUDA and 16-bit autocast)" : "") +
             (device.is_cuda() ? ", cuDNN attention off for that call" : "");
  }
  return fmt::format("attention on {} in {}, T={}, dropout {:g}: plain text's causal call -> {}; packed documents -> {}",
                     device.str(), c10::toString(dtype), T, dropout_p, causal, packed);
}

}  // namespace gpt2ft
