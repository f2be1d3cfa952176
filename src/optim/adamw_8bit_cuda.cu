// 8-bit AdamW's step on CUDA, one kernel per tensor. See the header.
#include "gpt2ft/optim/adamw_8bit_cuda.h"

#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

namespace gpt2ft {
namespace {

constexpr int kBlock = 256;  // values per quantization block = threads per CUDA block
constexpr int kWarps = kBlock / 32;

// ATen's lerp: self + weight * (end - self), from whichever end is nearer.
__device__ float lerp(float self, float end, float weight) {
  const float diff = __fsub_rn(end, self);
  return weight < 0.5f ? __fadd_rn(self, __fmul_rn(weight, diff))
                       : __fsub_rn(end, __fmul_rn(diff, __fsub_rn(1.0f, weight)));
}

// The block's largest value of x over its 256 threads (every thread gets it).
__device__ float block_max(float x, float* shared) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  float all = shared[0];
  for (int w = 1; w < kWarps; ++w) all = fmaxf(all, shared[w]);
  __syncthreads();  // shared is reused by the next call
  return all;
}

// The code of y (a moment over its block's scale) in the sorted 256-entry `map`: the largest
// entry <= y (code 0 when there is none), then the nearer of it and the next (ties up).
__device__ uint8_t nearest_code(float y, const float* map) {
  int code = 0;
  for (int step = 128; step > 0; step /= 2) {
    if (code + step <= 255 && map[code + step] <= y) code += step;
  }
  const int up = code < 255 ? code + 1 : code;
  const float low = map[code], high = map[up];
  return static_cast<uint8_t>(__fsub_rn(y, low) >= __fmul_rn(__fsub_rn(high, low), 0.5f) ? up : code);
}

template <bool kQuantized>
__global__ void __launch_bounds__(kBlock)
    adamw_8bit_kernel(AdamW8bitCudaTensor t, AdamW8bitCudaScalars k, const float* found_inf,
                      const float* signed_map_in, const float* unsigned_map_in) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // a skipped step changes nothing
  __shared__ float signed_map[kBlock], unsigned_map[kBlock], reduce[kWarps], corrections[2];
  const int tid = threadIdx.x;
  if (kQuantized) {
    signed_map[tid] = signed_map_in[tid];
    unsigned_map[tid] = unsigned_map_in[tid];
  }
  if (tid == 0) {  // the step's scalars from the advanced count: powers in double, rounded once
    const double step = static_cast<double>(*t.step);
    corrections[0] = __fsub_rn(1.0f, static_cast<float>(pow(k.beta1, step)));
    corrections[1] = __fsqrt_rn(__fsub_rn(1.0f, static_cast<float>(pow(k.beta2, step))));
  }
  __syncthreads();
  const float bias_correction1 = corrections[0], sqrt_bias_correction2 = corrections[1];
  const float decay = __fmul_rn(k.lr, t.weight_decay);
  const int64_t block = blockIdx.x;
  const int64_t i = block * kBlock + tid;
  const bool mine = i < t.numel;  // always, for a quantized tensor (a multiple of 256)

  float m = 0.0f, v = 0.0f;
  if (mine) {
    const uint8_t* m_codes = static_cast<const uint8_t*>(t.exp_avg);
    const uint8_t* v_codes = static_cast<const uint8_t*>(t.exp_avg_sq);
    const float m_old = kQuantized ? __fmul_rn(signed_map[m_codes[i]], t.exp_avg_scales[block])
                                   : static_cast<const float*>(t.exp_avg)[i];
    const float v_old = kQuantized ? __fmul_rn(unsigned_map[v_codes[i]], t.exp_avg_sq_scales[block])
                                   : static_cast<const float*>(t.exp_avg_sq)[i];
    const float g = t.grad[i];
    m = lerp(m_old, g, k.one_minus_beta1);
    v = lerp(v_old, __fmul_rn(g, g), k.one_minus_beta2);
    const float p = t.param[i];
    const float decayed = __fsub_rn(p, __fmul_rn(decay, p));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), sqrt_bias_correction2), k.eps);
    t.param[i] = __fsub_rn(decayed, __fdiv_rn(__fmul_rn(k.lr, __fdiv_rn(m, bias_correction1)), denom));
  }
  if (!kQuantized) {
    if (mine) {
      static_cast<float*>(t.exp_avg)[i] = m;
      static_cast<float*>(t.exp_avg_sq)[i] = v;
    }
    return;
  }
  const float m_scale = fmaxf(block_max(fabsf(m), reduce), 1e-12f);
  const float v_scale = fmaxf(block_max(fabsf(v), reduce), 1e-12f);
  static_cast<uint8_t*>(t.exp_avg)[i] = nearest_code(__fdiv_rn(m, m_scale), signed_map);
  static_cast<uint8_t*>(t.exp_avg_sq)[i] = nearest_code(__fdiv_rn(v, v_scale), unsigned_map);
  if (tid == 0) {
    t.exp_avg_scales[block] = m_scale;
    t.exp_avg_sq_scales[block] = v_scale;
  }
}

}  // namespace

bool adamw_8bit_cuda_kernel_available() { return true; }

void adamw_8bit_cuda_step(const AdamW8bitCudaTensor& t, const AdamW8bitCudaScalars& k, const float* found_inf,
                          const float* signed_map, const float* unsigned_map, void* stream) {
  if (t.numel == 0) return;
  const int64_t blocks = (t.numel + kBlock - 1) / kBlock;
  auto* s = static_cast<cudaStream_t>(stream);
  if (t.quantized) {
    adamw_8bit_kernel<true><<<static_cast<unsigned>(blocks), kBlock, 0, s>>>(t, k, found_inf, signed_map, unsigned_map);
  } else {
    adamw_8bit_kernel<false><<<static_cast<unsigned>(blocks), kBlock, 0, s>>>(t, k, found_inf, signed_map, unsigned_map);
  }
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess) {
    throw std::runtime_error(std::string("8-bit AdamW's CUDA kernel did not launch: ") + cudaGetErrorString(launched));
  }
}

}  // namespace gpt2ft
