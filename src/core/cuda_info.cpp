// CUDA device queries through c10/ATen's CUDA API.
#include "gpt2ft/core/cuda_info.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>

namespace gpt2ft {

std::string cuda_device_name(const c10::Device& device) {
  return at::cuda::getDeviceProperties(device.index())->name;
}

CudaMemory cuda_memory(const c10::Device& device) {
  using c10::CachingDeviceAllocator::StatType;
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  CudaMemory m;
  m.peak_allocated = stats.allocated_bytes[static_cast<size_t>(StatType::AGGREGATE)].peak;
  m.peak_reserved = stats.reserved_bytes[static_cast<size_t>(StatType::AGGREGATE)].peak;
  m.total = static_cast<int64_t>(at::cuda::getDeviceProperties(device.index())->totalGlobalMem);
  return m;
}

void cuda_reset_peak_memory(const c10::Device& device) {
  c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
}

void cuda_empty_cache() { c10::cuda::CUDACachingAllocator::emptyCache(); }

void cuda_synchronize(const c10::Device& device) {
  c10::cuda::CUDAGuard guard(device.index());
  at::cuda::device_synchronize();
}

void cuda_set_device(const c10::Device& device) { c10::cuda::set_device(device.index()); }

double gpu_peak_flops(const std::string& name) {
  // Vendor datasheet figures, dense (no sparsity), bf16/fp16 tensor cores.
  struct Peak {
    const char* fragment;
    double flops;
  };
  static const Peak peaks[] = {{"H200", 989e12}, {"H100 PCIe", 756e12}, {"H100", 989e12}, {"A100", 312e12},
                               {"L40S", 362e12}, {"A10G", 70e12},       {"RTX 4090", 165e12}, {"V100", 125e12}};
  for (const auto& p : peaks) {
    if (name.find(p.fragment) != std::string::npos) return p.flops;
  }
  return 0;
}

}  // namespace gpt2ft
