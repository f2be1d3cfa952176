// The CPU memory rehearsal: a counting allocator in front of libtorch's CPU allocator. It
// counts the live and peak bytes of tensor storage (thread-safely), per phase of a training
// step as well, and with a limit (cpu.memory_limit) throws c10::OutOfMemoryError, the type
// CUDA's caching allocator throws, from whichever allocation crosses it: deep inside an ATen
// op, in autograd's backward, in the loss's chunks, in the optimizer's step, in validation or
// while saving. So every out-of-memory path (the in-process back-off, exit 75 and 77,
// validation backing off alone) runs on the CPU as it would on a GPU, and the planner's
// prediction can be compared with a measured peak (plan --measure).
//
// Its reads mirror what the trainer reads from CUDA's caching allocator: the live bytes
// (memory_allocated), the peak since the last reset (max_memory_allocated) and a reset that
// sets the peak to the live bytes. Nothing is cached: bytes freed are free at once, so there is
// no "reserved" figure.
//
// Installed once per process (install_counting_cpu_allocator), for training on the CPU and for
// plan --measure; tensors allocated before it keep their own deleter and are not counted.
// Each allocation carries a 64-byte header (its size), which keeps the 64-byte alignment.
#pragma once

#include <array>
#include <cstdint>
#include <string>

namespace gpt2ft {

enum class MemoryPhase : int { kOther = 0, kForward, kLoss, kBackward, kOptimizer, kValidation, kSave };
inline constexpr int kMemoryPhases = 7;
const char* memory_phase_name(MemoryPhase phase);  // "forward", "loss", ...

struct CpuMemoryCounts {
  int64_t live = 0;                                  // bytes of tensor storage allocated now
  int64_t peak = 0;                                  // the most since the last reset
  std::array<int64_t, kMemoryPhases> phase_peak{};   // the most while each phase was marked
  int64_t limit = 0;                                 // cpu.memory_limit; 0: none
  int64_t refused = 0;                               // allocations refused at the limit
};

// Puts the counting allocator in front of the current CPU allocator (idempotent).
void install_counting_cpu_allocator();
bool counting_cpu_allocator_installed();
// Refuse any allocation that would take the live bytes over `bytes` (0: no limit).
void set_cpu_memory_limit(int64_t bytes);
CpuMemoryCounts cpu_memory_counts();
// The peaks (overall and per phase) become the live bytes now.
void reset_cpu_memory_peaks();

// Marks the phase of the step for the allocations made while it lives (process-wide: the
// training thread marks it; loader threads' allocations count in it too), then restores the
// one before.
class MemoryPhaseScope {
 public:
  explicit MemoryPhaseScope(MemoryPhase phase);
  ~MemoryPhaseScope();
  MemoryPhaseScope(const MemoryPhaseScope&) = delete;
  MemoryPhaseScope& operator=(const MemoryPhaseScope&) = delete;

 private:
  MemoryPhase previous_;
};

// "live 1.23 GiB, peak 2.34 GiB (forward 1.9, loss 2.3, ...)" for logs.
std::string describe_cpu_memory(const CpuMemoryCounts& counts);

}  // namespace gpt2ft
