// Bitwise-reproducible CPU maths: the same run gives the same bits on a loaded machine.
//
// libtorch's CPU matmuls are MKL's. On AVX-512 machines MKL picks among its kernels at start-up
// in a way that depends on how busy the machine is, so a process now and then computes with
// another kernel and rounds differently: measured here (Xeon with AVX-512 and AMX), 2-3% of
// identical runs started beside other work gave a first-step loss 1.5e-6 apart, and a resume
// or a split of the batch was then no longer bitwise equal. MKL's Conditional Numerical
// Reproducibility mode fixes the kernel: its AVX2 branch gave 360 of 360 identical runs
// ("AUTO" and "AVX512" still varied), at 1.37x the time of MKL's fastest kernels for the CPU
// (its COMPATIBLE branch, for CPUs without AVX2, 1.8x). scripts/soak/determinism.py checks it.
//
// So it is train.deterministic's, off by default (as PyTorch's use_deterministic_algorithms and
// HF Trainer's full_determinism are): without it MKL picks its fastest kernels. What holds
// either way is that a resume continues exactly what our code controls (the data position,
// the RNG streams, the optimizer state); with it, two processes of one config on machines of
// one kind also compute the same bits.
#pragma once

#include <c10/core/Device.h>

namespace gpt2ft {

// Sets MKL_CBWR (AVX2, or COMPATIBLE on CPUs without AVX2 and FMA) unless the user set it.
// Must run before MKL's first call, which reads it.
void request_reproducible_cpu_math();

// train.deterministic: the CPU's reproducible MKL branch, and on CUDA deterministic algorithms
// (an op without a deterministic version is an error that names it), CUBLAS_WORKSPACE_CONFIG
// :4096:8 unless set, cuDNN deterministic and without benchmark mode. Before any computation.
void request_deterministic_math(c10::DeviceType device);

}  // namespace gpt2ft
