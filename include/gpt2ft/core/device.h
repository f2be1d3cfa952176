// Turns a --device / "device" string ("auto", "cpu", "cuda", "cuda:N") into a torch::Device.
#pragma once

#include <string>

#include <c10/core/Device.h>

namespace gpt2ft {

// "auto" picks cuda:0 when CUDA is usable and the CPU otherwise. Asking for CUDA on a
// machine without it is an error naming `where` (the flag or config key).
c10::Device parse_device(const std::string& spec, const std::string& where = "--device");

// parse_device, then, for a GPU, makes it the current CUDA device before anything touches
// CUDA: otherwise contexts and page-locked host memory land on GPU 0 whatever N says.
c10::Device open_device(const std::string& spec, const std::string& where = "--device");

}  // namespace gpt2ft
