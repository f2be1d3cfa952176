// The few CUDA queries the trainer reports, kept in one file so only it needs CUDA headers.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <c10/core/Device.h>

namespace gpt2ft {

struct CudaMemory {
  int64_t peak_allocated = 0;  // bytes
  int64_t peak_reserved = 0;
  int64_t total = 0;           // the device's memory
};

std::string cuda_device_name(const c10::Device& device);
// Initialises CUDA and the caching allocator's per-device state, as the first CUDA tensor
// would. Every function here that reads or sets the allocator calls it first.
void cuda_init();
CudaMemory cuda_memory(const c10::Device& device);
void cuda_reset_peak_memory(const c10::Device& device);
void cuda_empty_cache();
void cuda_synchronize(const c10::Device& device);
// Makes `device` the calling thread's current CUDA device (one process per GPU), so that
// contexts, pinned host memory and cudaHostRegister land on it and not on GPU 0.
void cuda_set_device(const c10::Device& device);

// Whether the GPU computes in bfloat16 natively (compute capability 8.0 and newer).
bool cuda_supports_bfloat16(const c10::Device& device);

// Process-wide CUDA settings, applied before the first allocation on the device.
struct CudaSettings {
  bool tf32 = true;                 // float32 matmuls may use TF32 tensor cores
  bool expandable_segments = true;  // the caching allocator grows segments instead of adding new ones
  int64_t memory_limit = 0;         // bytes; > 0 caps the caching allocator (its memory fraction)
};
// Makes `device` current and applies `settings`, before the first allocation on it.
void configure_cuda(const c10::Device& device, const CudaSettings& settings);

// The caching allocator's settings string that turns expandable segments on while keeping every
// key the user set (PyTorch re-parses the whole string and resets the keys it does not name),
// given the values of PYTORCH_ALLOC_CONF and PYTORCH_CUDA_ALLOC_CONF (null: unset). Nothing
// when the user's settings name expandable_segments themselves: theirs win.
std::optional<std::string> allocator_settings_with_expandable_segments(const char* alloc_conf,
                                                                        const char* cuda_alloc_conf);

// Dense bf16/fp16 tensor-core peak FLOP/s of known GPUs by name; 0 when unknown.
double gpu_peak_flops(const std::string& device_name);

}  // namespace gpt2ft
