// Host float32 buffers for transfers to and from a GPU, page-locked at their exact size.
// (PyTorch's pinned-memory allocator rounds every request up to a power of two: a 41 MB
// tensor takes 64 MB of locked memory, which for gpt2-xl's offloaded optimizer would be
// several GiB more than planned.)
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

namespace gpt2ft {

// One float32 tensor of each shape in `shapes`, all in one allocation that is page-locked
// for CUDA when `pin` (with a warning, ordinary memory when the system refuses to lock it).
// Without `pin`, one tensor from the CPU allocator, so the CPU rehearsal counts it. Contents are uninitialised; the memory lives while any tensor does.
std::vector<torch::Tensor> host_float_buffers(const std::vector<std::vector<int64_t>>& shapes, bool pin);

}  // namespace gpt2ft
