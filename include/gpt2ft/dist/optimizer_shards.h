// ZeRO stage 1: the AdamW state sharded across the data-parallel ranks.
//
// Every trained parameter gets an owner rank (largest tensors first, each to the rank that
// owns the fewest elements so far). A rank keeps AdamW moments only for the parameters it
// owns and updates only those; the gradients are still averaged everywhere, so clipping sees
// the whole gradient. After the step each owner broadcasts its updated weights, so all ranks
// hold the same model again. Checkpoints gather the full state to rank 0 (they do not depend
// on the number of ranks), and each rank restores only the part it owns.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "gpt2ft/dist/communicator.h"
#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/train/adamw.h"

namespace gpt2ft {

// The owner rank of each tensor, given the tensors' element counts.
std::vector<int> partition_parameters(const std::vector<int64_t>& numels, int world_size);

class OptimizerShards {
 public:
  using Named = std::vector<std::pair<std::string, torch::Tensor>>;
  // `trained`: the trained parameters in a fixed order, the same on every rank.
  OptimizerShards(Communicator& comm, Named trained);

  // The parameters this rank updates (give these to its AdamW).
  Named owned() const;
  // After every rank stepped its own parameters: all ranks get every updated weight.
  void broadcast_updated_weights();
  // Collective. Rank 0 receives every parameter's AdamW state ("adamw.exp_avg.<name>", ...),
  // the others an empty list. `mine` is this rank's AdamW over owned().
  NamedTensors gather_state(const AdamW& mine);

 private:
  Communicator& comm_;
  Named trained_;
  std::vector<int> owner_;
};

}  // namespace gpt2ft
