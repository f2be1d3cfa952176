// 8-bit AdamW's step on CUDA as one kernel per tensor (optim/adamw_8bit.h has the update and
// the block-wise format): a CUDA block of 256 threads per quantization block of 256 values
// dequantizes its moments, updates them and the weights, takes the block's largest |moment|
// and quantizes them again, in one pass and without a temporary tensor. A step whose found_inf
// is nonzero returns at once on the device (nothing changes, no host sync).
//
// Plain pointers and no torch header, so that nvcc compiles it in seconds; adamw_8bit.cpp
// launches it on the current stream. Float32 operations round one at a time (no contracted
// multiply-adds), in the order of the ATen ops the CPU path runs.
#pragma once

#include <cstdint>

namespace gpt2ft {

struct AdamW8bitCudaTensor {
  float* param;               // (n) float32, contiguous
  const float* grad;          // (n)
  void* exp_avg;              // (n) uint8 codes when quantized, else float32
  void* exp_avg_sq;           // (n)
  float* exp_avg_scales;      // (n / 256) quantized only
  float* exp_avg_sq_scales;   // (n / 256)
  const float* step;          // () the step count, already advanced for this step
  int64_t numel = 0;
  bool quantized = false;
  float weight_decay = 0;     // this tensor's (0 for biases and LayerNorms)
};

struct AdamW8bitCudaScalars {
  float lr;
  double beta1, beta2;  // for the bias corrections 1 - beta^step
  float one_minus_beta1, one_minus_beta2, eps;
};

// Whether the kernel was built in (a CUDA compiler was found at configure time).
bool adamw_8bit_cuda_kernel_available();

// Launches the step of one tensor on `stream` (a cudaStream_t). found_inf: () float32 on the
// device, or null. signed_map / unsigned_map: the (256) dynamic maps on the device.
void adamw_8bit_cuda_step(const AdamW8bitCudaTensor& t, const AdamW8bitCudaScalars& k, const float* found_inf,
                          const float* signed_map, const float* unsigned_map, void* stream);

}  // namespace gpt2ft
