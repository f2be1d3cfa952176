// Out-of-memory helpers.
#include "gpt2ft/core/out_of_memory.h"

#include <string>

#include <ATen/autocast_mode.h>
#include <c10/util/Exception.h>

#include "gpt2ft/core/cuda_info.h"

namespace gpt2ft {

bool is_out_of_memory(const std::exception& e) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&e)) return true;
  const std::string what = e.what();
  return what.find("out of memory") != std::string::npos || what.find("CUBLAS_STATUS_ALLOC_FAILED") != std::string::npos;
}

void release_cached_memory(c10::Device device) {
  at::autocast::clear_cache();
  if (device.is_cuda()) cuda_empty_cache();
}

}  // namespace gpt2ft
