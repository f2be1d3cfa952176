// MKL's reproducible mode, chosen for the CPU.
#include "gpt2ft/core/reproducible_math.h"

#include <ATen/Context.h>

#include <cstdlib>

namespace gpt2ft {

void request_reproducible_cpu_math() {
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  ::setenv("MKL_CBWR", avx2 ? "AVX2" : "COMPATIBLE", /*overwrite=*/0);
}

void request_deterministic_math(c10::DeviceType device) {
  request_reproducible_cpu_math();  // the CPU computes on CUDA runs too (the optimizer offload, evaluation's host work)
  if (device != c10::DeviceType::CUDA) return;
  ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);  // before cuBLAS makes its first handle
  at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/false);
  at::globalContext().setDeterministicCuDNN(true);
  at::globalContext().setBenchmarkCuDNN(false);
}

}  // namespace gpt2ft
