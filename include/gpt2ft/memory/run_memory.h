// What a training config means for memory: the planner's input for it, the memory a device
// offers a training step, and train.micro_batch_size "auto".
#pragma once

#include <cstdint>
#include <string>
#include <optional>

#include <c10/core/Device.h>

#include "gpt2ft/memory/planner.h"
#include "gpt2ft/train/batch_split.h"
#include "gpt2ft/train/config.h"

namespace gpt2ft {

// The memory planner's view of a config: model shape (read from model.init_from's
// config.json or the preset, with the config's vocabulary resize and dropout), T, AMP,
// checkpointing, frozen parameters and the global batch, for `world_size` ranks. Loads no
// weights.
MemoryPlanInput memory_plan_input(const TrainConfig& config, int64_t world_size = 1);

// The memory a training step may plan for: on CUDA the GPU's memory (or cuda.memory_limit)
// less 1 GiB for the CUDA context and libraries, and 5% for the caching allocator's rounding
// and fragmentation; on the CPU half the host's memory.
int64_t plannable_memory(const TrainConfig& config, c10::Device device);
// The same margins applied to a GPU of `device_bytes`.
int64_t plannable_of(int64_t device_bytes);
// Where plannable_memory() comes from, in words, with its figures ("cpu.memory_limit \"16MB\" =
// 15.3 MiB of tensor bytes ...", "the GPU's 79.1 GiB, less 1 GiB ...: 74.2 GiB usable").
std::string describe_plannable_memory(const TrainConfig& config, c10::Device device);

// train.micro_batch_size "auto": the largest divisor of the per-rank batch whose planned peak
// fits plannable_memory(). The out-of-memory back-off remains the safety net.
// With gradient_accumulation_steps instead of a global batch (split.auto_accumulation), the
// largest micro batch that fits, at most kAutoMicroBatchCap: the global batch follows from it.
inline constexpr int64_t kAutoMicroBatchCap = 64;
int64_t auto_micro_batch(const TrainConfig& config, c10::Device device, const BatchSplit& split);

// The least activation checkpointing (none, then every N-th block for N = L, L-1, ... 2,
// then all blocks) whose planned peak at micro batch `micro` fits `budget`: its every-N value
// (0 none, 1 all), or nullopt when not even all blocks do.
std::optional<int64_t> least_checkpointing_that_fits(MemoryPlanInput input, int64_t micro, int64_t budget);

// model.activation_checkpointing "auto" for a run: least_checkpointing_that_fits at the
// configured micro batch (with micro batch "auto" too: min(per-rank batch, 8), leaving "auto"
// to pick the largest that then fits) in plannable_memory(); logged with the predicted peak.
int64_t auto_checkpointing(const TrainConfig& config, c10::Device device, const BatchSplit& split);

}  // namespace gpt2ft
