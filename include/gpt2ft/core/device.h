// Turns a --device / "device" string ("auto", "cpu", "cuda", "cuda:N") into a torch::Device.
#pragma once

#include <string>

#include <c10/core/Device.h>

namespace gpt2ft {

// "auto" picks cuda:0 when CUDA is usable and the CPU otherwise. Asking for CUDA on a
// machine without it is an error naming `where` (the flag or config key).
c10::Device parse_device(const std::string& spec, const std::string& where = "--device");

}  // namespace gpt2ft
