// CUDA device queries through c10/ATen's CUDA API.
#include "gpt2ft/core/cuda_info.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/core/AllocatorConfig.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <optional>

namespace gpt2ft {

std::string cuda_device_name(const c10::Device& device) {
  return at::cuda::getDeviceProperties(device.index())->name;
}

void cuda_init() {
  // Creates the caching allocator's per-device state (what the first CUDA tensor would): its
  // statistics, memory fraction and cache calls throw "Allocator not initialized" before that.
  // Idempotent and cheap after the first call.
  at::globalContext().lazyInitDevice(c10::kCUDA);
}

CudaMemory cuda_memory(const c10::Device& device) {
  using c10::CachingDeviceAllocator::StatType;
  cuda_init();
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  CudaMemory m;
  m.peak_allocated = stats.allocated_bytes[static_cast<size_t>(StatType::AGGREGATE)].peak;
  m.peak_reserved = stats.reserved_bytes[static_cast<size_t>(StatType::AGGREGATE)].peak;
  m.total = static_cast<int64_t>(at::cuda::getDeviceProperties(device.index())->totalGlobalMem);
  return m;
}

void cuda_reset_peak_memory(const c10::Device& device) {
  cuda_init();
  c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
}

void cuda_empty_cache() {
  cuda_init();
  c10::cuda::CUDACachingAllocator::emptyCache();
}

void cuda_synchronize(const c10::Device& device) {
  c10::cuda::CUDAGuard guard(device.index());
  at::cuda::device_synchronize();
}

void cuda_set_device(const c10::Device& device) {
  c10::cuda::set_device(device.index());
  cuda_init();
}

bool cuda_supports_bfloat16(const c10::Device& device) {
  return at::cuda::getDeviceProperties(device.index())->major >= 8;
}

std::optional<std::string> allocator_settings_with_expandable_segments(const char* alloc_conf,
                                                                        const char* cuda_alloc_conf) {
  // PyTorch reads PYTORCH_ALLOC_CONF, and PYTORCH_CUDA_ALLOC_CONF only when the first is unset.
  const std::string user = alloc_conf ? alloc_conf : cuda_alloc_conf ? cuda_alloc_conf : "";
  if (user.find("expandable_segments") != std::string::npos) return std::nullopt;  // theirs wins
  // setAllocatorSettings parses the whole string anew and resets every key it does not name,
  // so the user's keys go in again, unchanged, before ours.
  const bool blank = user.find_first_not_of(" \t,") == std::string::npos;
  return (blank ? std::string() : user + ",") + "expandable_segments:True";
}

void configure_cuda(const c10::Device& device, const CudaSettings& settings) {
  at::globalContext().setFloat32MatmulPrecision(settings.tf32 ? "high" : "highest");
  if (settings.expandable_segments) {
    const auto merged = allocator_settings_with_expandable_segments(std::getenv("PYTORCH_ALLOC_CONF"),
                                                                    std::getenv("PYTORCH_CUDA_ALLOC_CONF"));
    if (merged) {
      c10::CachingAllocator::setAllocatorSettings(*merged);
      spdlog::debug("CUDA caching allocator settings: {}", *merged);
    } else {
      spdlog::info("cuda.expandable_segments: left as PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF sets it");
    }
  }
  cuda_set_device(device);  // also initialises the allocator, which the memory fraction needs
  if (settings.memory_limit > 0) {
    const auto total = static_cast<double>(at::cuda::getDeviceProperties(device.index())->totalGlobalMem);
    if (settings.memory_limit >= total) {
      spdlog::warn("cuda.memory_limit ({:.2f} GiB) is not below the GPU's memory ({:.2f} GiB): no cap",
                   settings.memory_limit / double(1ll << 30), total / double(1ll << 30));
    } else {
      c10::cuda::CUDACachingAllocator::setMemoryFraction(settings.memory_limit / total, device.index());
      spdlog::info("cuda.memory_limit: the caching allocator is capped at {:.2f} GiB of the GPU's {:.2f} GiB",
                   settings.memory_limit / double(1ll << 30), total / double(1ll << 30));
    }
  }
}

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
