// The counting CPU allocator. See the header.
#include "gpt2ft/memory/counting_allocator.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>

namespace gpt2ft {
namespace {

constexpr size_t kHeader = 64;  // the allocation's size, in front of the data; keeps 64-byte alignment

struct Counters {
  std::atomic<int64_t> live{0}, peak{0}, limit{0}, refused{0};
  std::array<std::atomic<int64_t>, kMemoryPhases> phase_peak{};
  std::atomic<int> phase{0};
};
Counters& counters() {
  static Counters c;
  return c;
}

void raise_to(std::atomic<int64_t>& peak, int64_t value) {
  int64_t seen = peak.load(std::memory_order_relaxed);
  while (value > seen && !peak.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}

double gib(int64_t bytes) { return static_cast<double>(bytes) / double(1ll << 30); }

std::string size_text(int64_t bytes) {
  return bytes >= (1ll << 30) ? fmt::format("{:.2f} GiB", gib(bytes)) : fmt::format("{:.2f} MiB", bytes / double(1 << 20));
}

class CountingAllocator final : public c10::Allocator {
 public:
  // With c10's default allocator underneath, the memory is asked of the host here, as it would
  // (posix_memalign, freed with free_cpu), so that a refusal is an error, not its abort.
  explicit CountingAllocator(c10::Allocator* inner)
      : inner_(inner), inner_deleter_(inner->raw_deleter()), own_memory_(inner == c10::GetDefaultCPUAllocator()) {}

  c10::DataPtr allocate(size_t n) override {
    Counters& c = counters();
    const int64_t bytes = static_cast<int64_t>(n);
    const int64_t now = c.live.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    const int64_t limit = c.limit.load(std::memory_order_relaxed);
    if (limit > 0 && now > limit) {
      c.live.fetch_sub(bytes, std::memory_order_relaxed);
      c.refused.fetch_add(1, std::memory_order_relaxed);
      const int64_t held = now - bytes;
      const auto phase = static_cast<MemoryPhase>(c.phase.load(std::memory_order_relaxed));
      TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU out of memory (in ", memory_phase_name(phase),
                       "). Tried to allocate ", size_text(bytes),
                       ". cpu.memory_limit is ", size_text(limit), ", of which ", size_text(std::max<int64_t>(0, limit - held)),
                       " is free. Of the allocated memory ", size_text(held), " is allocated by tensors.");
    }
    raise_to(c.peak, now);
    raise_to(c.phase_peak[static_cast<size_t>(c.phase.load(std::memory_order_relaxed))], now);
    void* base = nullptr;
    if (own_memory_) {
      // c10's own allocator aborts the process when the host refuses (its enforce logs FATAL):
      // the same memory (posix_memalign, freed by free_cpu) asked for here fails as an
      // out-of-memory error instead, which the trainer reports in one line.
      const int err = posix_memalign(&base, c10::gAlignment, n + kHeader);
      if (err != 0 || base == nullptr) {
        c.live.fetch_sub(bytes, std::memory_order_relaxed);
        TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU out of memory (in ",
                         memory_phase_name(static_cast<MemoryPhase>(c.phase.load(std::memory_order_relaxed))),
                         "): the host refused ", size_text(bytes), " (", std::strerror(err),
                         "): the machine's memory or the process's address-space limit (ulimit -v) is spent. ",
                         size_text(now - bytes), " is allocated by tensors");
      }
    } else {
      try {
        base = inner_->raw_allocate(n + kHeader);
      } catch (...) {
        c.live.fetch_sub(bytes, std::memory_order_relaxed);
        throw;
      }
    }
    std::memcpy(base, &n, sizeof(n));
    void* data = static_cast<char*>(base) + kHeader;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static CountingAllocator* instance;

 private:
  static void release(void* data) {
    void* base = static_cast<char*>(data) - kHeader;
    size_t n = 0;
    std::memcpy(&n, base, sizeof(n));
    counters().live.fetch_sub(static_cast<int64_t>(n), std::memory_order_relaxed);
    if (instance->own_memory_) c10::free_cpu(base);
    else instance->inner_deleter_(base);
  }

  c10::Allocator* inner_;
  c10::DeleterFnPtr inner_deleter_;
  bool own_memory_;
};
CountingAllocator* CountingAllocator::instance = nullptr;

}  // namespace

const char* memory_phase_name(MemoryPhase phase) {
  static constexpr const char* kNames[kMemoryPhases] = {"other",     "forward",    "loss", "backward",
                                                        "optimizer", "validation", "save"};
  return kNames[static_cast<int>(phase)];
}

void install_counting_cpu_allocator() {
  static std::once_flag once;
  std::call_once(once, [] {
    c10::Allocator* inner = c10::GetCPUAllocator();
    TORCH_CHECK(inner->raw_deleter() != nullptr, "the CPU allocator has no raw deleter: it cannot be counted");
    CountingAllocator::instance = new CountingAllocator(inner);  // lives as long as the process
    c10::SetCPUAllocator(CountingAllocator::instance, /*priority=*/100);
  });
}

bool counting_cpu_allocator_installed() { return CountingAllocator::instance != nullptr; }

void set_cpu_memory_limit(int64_t bytes) { counters().limit.store(std::max<int64_t>(0, bytes)); }

CpuMemoryCounts cpu_memory_counts() {
  const Counters& c = counters();
  CpuMemoryCounts out;
  out.live = c.live.load();
  out.peak = c.peak.load();
  for (int p = 0; p < kMemoryPhases; ++p) out.phase_peak[static_cast<size_t>(p)] = c.phase_peak[static_cast<size_t>(p)].load();
  out.limit = c.limit.load();
  out.refused = c.refused.load();
  return out;
}

void reset_cpu_memory_peaks() {
  Counters& c = counters();
  const int64_t live = c.live.load();
  c.peak.store(live);
  for (auto& p : c.phase_peak) p.store(0);
  c.phase_peak[static_cast<size_t>(c.phase.load())].store(live);
}

MemoryPhaseScope::MemoryPhaseScope(MemoryPhase phase)
    : previous_(static_cast<MemoryPhase>(counters().phase.exchange(static_cast<int>(phase)))) {
  raise_to(counters().phase_peak[static_cast<size_t>(phase)], counters().live.load());
}

MemoryPhaseScope::~MemoryPhaseScope() { counters().phase.store(static_cast<int>(previous_)); }

std::string describe_cpu_memory(const CpuMemoryCounts& counts) {
  std::string phases;
  for (int p = 1; p < kMemoryPhases; ++p) {
    const int64_t bytes = counts.phase_peak[static_cast<size_t>(p)];
    if (bytes > 0) phases += fmt::format("{}{} {:.3f}", phases.empty() ? "" : ", ", memory_phase_name(static_cast<MemoryPhase>(p)), gib(bytes));
  }
  return fmt::format("CPU tensor memory: live {:.3f} GiB, peak {:.3f} GiB{}{}", gib(counts.live), gib(counts.peak),
                     phases.empty() ? "" : " (peak by phase, GiB: " + phases + ")",
                     counts.limit > 0 ? fmt::format("; cpu.memory_limit {:.3f} GiB", gib(counts.limit)) : "");
}

}  // namespace gpt2ft
