// Built instead of adamw_8bit_cuda.cu when no CUDA compiler was found at configure time:
// 8-bit AdamW on CUDA then runs its ATen ops (optim/adamw_8bit.h).
#include "gpt2ft/optim/adamw_8bit_cuda.h"

#include "gpt2ft/core/error.h"

namespace gpt2ft {

bool adamw_8bit_cuda_kernel_available() { return false; }

void adamw_8bit_cuda_step(const AdamW8bitCudaTensor&, const AdamW8bitCudaScalars&, const float*, const float*,
                          const float*, void*) {
  throw Error("8-bit AdamW's CUDA kernel was not built (no CUDA compiler at configure time)");
}

}  // namespace gpt2ft
