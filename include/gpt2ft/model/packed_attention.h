// Attention over packed documents (data.packing "documents"), and which fused kernel SDPA picks.
//
// attention.packed "mask" (the default, every device): SDPA with document_attention_mask and no
// causal flag. On CUDA, flash attention refuses any explicit mask, and on sm90 with cuDNN newer
// than 9.15 (the torch wheel carries 9.19) libtorch 2.11 tries cuDNN attention first. cuDNN's
// backward returns NaN in dQ when a mask is given, T % 128 == 64 and some row's log-sum-exp is
// below -88.7 (PyTorch issue 196678; padding rows can set it off though their gradient is 0).
// So the masked call runs with cuDNN attention off for its own duration (CudnnAttentionOff) and
// memory-efficient attention takes it; the causal call of plain text is left as it is.
//
// attention.packed "varlen" (CUDA under bfloat16 / float16 autocast; elsewhere the mask is
// used): flash attention over variable-length sequences. The B rows are flattened into B*T
// tokens and each document (positions restart at 0 where one starts) is a sequence of its own,
// causal within itself: no T x T mask, no tile outside a document computed. The loader finds
// the sequences on the host with the batch (a row's trailing padding one sequence) and ships
// them with it, so the forward pass never waits on the device; without them (a caller that
// passes positions alone) they are found on the device, one host sync a pass, each padding
// token its own sequence.
#pragma once

#include <string>

#include <torch/types.h>

#include "gpt2ft/model/config.h"
#include "gpt2ft/model/gpt2.h"

namespace gpt2ft {

// Switches cuDNN's SDPA backend off for a scope when `device` is CUDA and the user has it on;
// puts it back on when the scope ends.
class CudnnAttentionOff {
 public:
  explicit CudnnAttentionOff(c10::Device device);
  ~CudnnAttentionOff();
  CudnnAttentionOff(const CudnnAttentionOff&) = delete;
  CudnnAttentionOff& operator=(const CudnnAttentionOff&) = delete;

 private:
  bool switched_ = false;
};

// How the documents of a packed batch attend: positions (B, T) -> the mask, or on CUDA with a
// 16-bit `dtype` and how == kVarlen the sequences for varlen flash attention: `bounds` when the
// loader found them, else found here from the positions (one host sync).
DocumentAttention document_attention(const torch::Tensor& positions, PackedAttention how, c10::ScalarType dtype,
                                     const SequenceBounds& bounds = {});

// q, k, v (B, NH, T, HD) -> (B, NH, T, HD): causal attention when `docs` is not packed, else
// each document attending only to itself, by the path `docs` holds.
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const DocumentAttention& docs, double dropout_p);

// The backend SDPA picks for these inputs, as PyTorch names it: "flash attention",
// "memory-efficient attention", "cuDNN attention", "math" (unfused).
std::string sdpa_backend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& mask, double dropout_p, bool is_causal);

// One line for the log: the kernel plain text's causal call and packed documents' call use on
// `device` for a model of this shape at sequence length T in `dtype` (the compute dtype) with
// attention dropout `dropout_p`.
std::string describe_attention_kernels(const GPT2Config& config, c10::Device device, c10::ScalarType dtype,
                                       int64_t T, double dropout_p, PackedAttention how);

}  // namespace gpt2ft
