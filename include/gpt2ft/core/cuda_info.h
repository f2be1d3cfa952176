// The few CUDA queries the trainer reports, kept in one file so only it needs CUDA headers.
#pragma once

#include <cstdint>
#include <string>

#include <c10/core/Device.h>

namespace gpt2ft {

struct CudaMemory {
  int64_t peak_allocated = 0;  // bytes
  int64_t peak_reserved = 0;
  int64_t total = 0;           // the device's memory
};

std::string cuda_device_name(const c10::Device& device);
CudaMemory cuda_memory(const c10::Device& device);
void cuda_reset_peak_memory(const c10::Device& device);
void cuda_empty_cache();
void cuda_synchronize(const c10::Device& device);
// Makes `device` the calling thread's current CUDA device (one process per GPU).
void cuda_set_device(const c10::Device& device);

// Whether the GPU computes in bfloat16 natively (compute capability 8.0 and newer).
bool cuda_supports_bfloat16(const c10::Device& device);

// Process-wide CUDA settings, applied before the first allocation on the device.
struct CudaSettings {
  bool tf32 = true;                 // float32 matmuls may use TF32 tensor cores
  bool expandable_segments = true;  // the caching allocator grows segments instead of adding new ones
  int64_t memory_limit = 0;         // bytes; > 0 caps the caching allocator (its memory fraction)
};
void configure_cuda(const c10::Device& device, const CudaSettings& settings);

// Dense bf16/fp16 tensor-core peak FLOP/s of known GPUs by name; 0 when unknown.
double gpu_peak_flops(const std::string& device_name);

}  // namespace gpt2ft
