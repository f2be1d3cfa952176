// MKL's reproducible mode, chosen for the CPU.
#include "gpt2ft/core/reproducible_math.h"

#include <cstdlib>

namespace gpt2ft {

void request_reproducible_cpu_math() {
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  ::setenv("MKL_CBWR", avx2 ? "AVX2" : "COMPATIBLE", /*overwrite=*/0);
}

}  // namespace gpt2ft
