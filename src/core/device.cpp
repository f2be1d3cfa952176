// Device selection.
#include "gpt2ft/core/device.h"

#include <torch/cuda.h>

#include "gpt2ft/core/cuda_info.h"
#include "gpt2ft/core/error.h"

namespace gpt2ft {

c10::Device parse_device(const std::string& spec, const std::string& where) {
  if (spec == "auto") {
    return torch::cuda::is_available() ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  }
  if (spec == "cpu") return c10::Device(c10::kCPU);
  if (spec == "cuda" || spec.rfind("cuda:", 0) == 0) {
    int index = 0;
    if (spec.size() > 5) {
      const std::string digits = spec.substr(5);
      if (digits.empty() || digits.size() > 4 || digits.find_first_not_of("0123456789") != std::string::npos) {
        throw Error(where + ": expected \"cuda:N\" with N a GPU index, got \"" + spec + "\"");
      }
      index = std::stoi(digits);
    }
    const int count = static_cast<int>(torch::cuda::device_count());
    if (count == 0) {
      throw Error(where + ": \"" + spec +
                  "\" asks for CUDA but no CUDA device is usable on this machine; use \"cpu\" or \"auto\"");
    }
    if (index >= count) {
      throw Error(where + ": \"" + spec + "\" asks for GPU " + std::to_string(index) + " but only " +
                  std::to_string(count) + " GPU(s) are visible");
    }
    return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  throw Error(where + ": expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got \"" + spec + "\"");
}

c10::Device open_device(const std::string& spec, const std::string& where) {
  const c10::Device device = parse_device(spec, where);
  if (device.is_cuda()) cuda_set_device(device);
  return device;
}

}  // namespace gpt2ft
