// Out-of-memory errors: recognising CUDA's and releasing what a failed pass left cached.
// (core/fault_injection.h raises them on purpose, so the recovery paths run on the CPU too.)
#pragma once

#include <cstdint>
#include <exception>

#include <c10/core/Device.h>

namespace gpt2ft {

// c10::OutOfMemoryError, or an error whose message says the GPU ran out of memory (cuBLAS
// reports its own allocation failures).
bool is_out_of_memory(const std::exception& e);

// After a failed pass: drops autocast's cached weight casts and, on CUDA, returns the caching
// allocator's free blocks, so the retry starts from what is really in use.
void release_cached_memory(c10::Device device);

}  // namespace gpt2ft
