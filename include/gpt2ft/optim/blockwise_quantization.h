// Block-wise 8-bit quantization of optimizer state, as torchao 0.18's OptimState8bit (after
// bitsandbytes, Dettmers et al. 2021, arXiv:2110.02861): a tensor of n values, n a multiple of
// the block size, is cut into blocks; each block keeps one float32 scale, the largest |value|
// in it (at least 1e-12), and each value the index (its code) of the nearest entry of a
// 256-value "dynamic" map of value / scale, with ties going to the larger entry.
//
// The dynamic maps: for k = 0..6, the midpoints of 2^k (signed; 2^(k+1) unsigned) equal steps
// of [0.1, 1], times 10^(k-6); the signed map also holds their negatives; both hold 0 and 1.
// Sorted, 256 float32 values in [-1, 1] (signed) or [0, 1] (unsigned).
#pragma once

#include <cstdint>

#include <torch/types.h>

namespace gpt2ft {

inline constexpr int64_t kQuantizationBlock = 256;

// The map as a (256) float32 tensor on the CPU.
torch::Tensor dynamic_quantization_map(bool is_signed);

// The code of each y (any shape, float32, already divided by its scale): the nearest entry of
// the sorted `map` (256), ties to the larger; below map[0], code 0. (n) int32, y's shape. One
// binary search per value (searchsorted) instead of eight steps of tensor ops, so a few
// kernels on CUDA; the same codes as searching step by step for the largest entry <= y, for
// every y but NaN (a NaN moment comes only from a step that is skipped).
torch::Tensor nearest_codes(const torch::Tensor& y, const torch::Tensor& map);

// x (n) float32 -> codes (n) uint8 and scales (n / block) float32, written into the given
// tensors (on x's device). n must be a multiple of `block`.
void quantize_blockwise(const torch::Tensor& x, const torch::Tensor& map, int64_t block, torch::Tensor& codes,
                        torch::Tensor& scales);

// codes (n) uint8, scales (n / block) -> (n) float32: map[code] * scale.
torch::Tensor dequantize_blockwise(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& map);

}  // namespace gpt2ft
