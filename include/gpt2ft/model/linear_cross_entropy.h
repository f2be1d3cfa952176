// The output projection and the mean next-token cross-entropy in one autograd Function that
// never holds the logits of the whole micro batch.
//
// The rows of `hidden` are taken in chunks. For each chunk the logits (rows, V) are computed
// (under autocast in its 16-bit type, like the eager lm_head; the weight is cast to that type
// once per call), then in float32 their log-sum-exp and loss, and straight away the loss's
// gradient with respect to them, (softmax - onehot) / N, in place (the 1/N applied to the
// float32 products, so float16 does not flush small probabilities); that gradient is
// multiplied into d hidden and d weight (summed straight into float32 on CUDA) and the
// chunk's logits are dropped. Backward only scales the two saved gradients by the incoming
// gradient (the loss scale, the 1/accumulation). Memory: one (rows, V) block, the 16-bit
// weight copy and the two gradients, instead of the eager path's logits, their float32 copy,
// log-softmax and its gradient ((b + 12) V bytes per token). FLOPs: the same three matmuls
// as eager.
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace gpt2ft {

// hidden (N, C), weight (V, C), targets (N) int64 -> mean cross-entropy of hidden @ weight^T,
// a float32 scalar; with divisor > 0 the sum over the N rows / divisor instead (a share of a
// loss normalised over several micro batches). chunk_rows <= 0 picks
// linear_cross_entropy_chunk_rows().
torch::Tensor linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                   const torch::Tensor& targets, int64_t chunk_rows = 0, double divisor = 0);

// hidden (N, C), weight (V, C), targets (N) int64 -> (N) float32 log-probabilities of each
// row's target under softmax(hidden @ weight^T), chunked as above. The incoming gradient
// differs per row (a preference loss weighs each sequence), so nothing is precomputed:
// backward recomputes each chunk's logits and softmax (four matmuls in all instead of three).
torch::Tensor linear_target_logprobs(const torch::Tensor& hidden, const torch::Tensor& weight,
                                     const torch::Tensor& targets, int64_t chunk_rows = 0);

// Rows per chunk: one chunk of float32 logits is ~64 MiB on the CPU, ~128 MiB on CUDA (fewer,
// larger matmuls and kernels: ~25 chunks per 16K tokens of GPT-2's vocabulary instead of ~50).
int64_t linear_cross_entropy_chunk_rows(int64_t vocab_size, bool cuda);

}  // namespace gpt2ft
