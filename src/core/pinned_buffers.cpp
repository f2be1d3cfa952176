// Page-locked host buffers through cudaHostRegister.
#include "gpt2ft/core/pinned_buffers.h"

#include <cuda_runtime_api.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <cstdlib>
#include <memory>
#include <new>
#include <string>

namespace gpt2ft {

std::vector<torch::Tensor> host_float_buffers(const std::vector<std::vector<int64_t>>& shapes, bool pin) {
  constexpr size_t kPage = 4096;
  const auto numel = [](const std::vector<int64_t>& shape) {
    size_t n = 1;
    for (const int64_t d : shape) n *= static_cast<size_t>(d);
    return n;
  };
  size_t elements = 0;
  for (const auto& shape : shapes) elements += numel(shape);
  if (!pin) {  // ordinary memory: one tensor from the CPU allocator (counted under the CPU rehearsal), in views
    const torch::Tensor block = torch::empty({static_cast<int64_t>(elements)}, torch::kFloat);
    std::vector<torch::Tensor> out;
    int64_t offset = 0;
    for (const auto& shape : shapes) {
      const auto n = static_cast<int64_t>(numel(shape));
      out.push_back(block.narrow(0, offset, n).view(shape));
      offset += n;
    }
    return out;
  }
  const size_t bytes = std::max<size_t>(kPage, (elements * sizeof(float) + kPage - 1) / kPage * kPage);
  void* data = nullptr;
  if (posix_memalign(&data, kPage, bytes) != 0) throw std::bad_alloc();
  bool pinned = false;
  if (pin) {
    const cudaError_t status = cudaHostRegister(data, bytes, cudaHostRegisterDefault);
    pinned = status == cudaSuccess;
    if (!pinned) {
      cudaGetLastError();  // clear it
      static bool warned = false;
      if (!warned) {
        spdlog::warn("could not page-lock {:.1f} MiB of host memory ({}): transfers to and from the GPU will be "
                     "slower (check `ulimit -l`)",
                     static_cast<double>(bytes) / (1 << 20), cudaGetErrorString(status));
        warned = true;
      }
    }
  }
  const std::shared_ptr<void> owner(data, [pinned](void* p) {
    if (pinned) cudaHostUnregister(p);
    std::free(p);
  });
  std::vector<torch::Tensor> out;
  size_t offset = 0;
  for (const auto& shape : shapes) {
    out.push_back(torch::from_blob(static_cast<float*>(data) + offset, shape, [owner](void*) {},
                                   torch::TensorOptions().dtype(torch::kFloat)));
    offset += numel(shape);
  }
  return out;
}

}  // namespace gpt2ft
