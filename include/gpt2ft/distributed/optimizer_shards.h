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
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gpt2ft/distributed/communicator.h"
#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/optim/optimizer.h"

namespace gpt2ft {

// The owner rank of each tensor, given the tensors' element counts.
std::vector<int> partition_parameters(const std::vector<int64_t>& numels, int world_size);

class OptimizerShards final : public Optimizer {
 public:
  using Named = std::vector<std::pair<std::string, torch::Tensor>>;
  // The optimizer of one rank's share (AdamW, or AdamW offloaded to the host).
  using MakeShardOptimizer = std::function<std::unique_ptr<Optimizer>(const Named& owned)>;
  // `trained`: the trained parameters in a fixed order, the same on every rank.
  OptimizerShards(Communicator& comm, Named trained, const MakeShardOptimizer& make);

  // This rank's optimizer steps the parameters it owns; then every owner broadcasts them, so
  // all ranks hold every updated weight. (begin_last_backward is not passed on: gradients are
  // final only once the ranks have averaged them.)
  void step(double lr, const GradientScaling& scaling = {}) override;
  std::string run_report() const override { return mine_->run_report(); }
  // Collective. Rank 0 receives every parameter's AdamW state ("adamw.exp_avg.<name>", ...),
  // the others an empty list.
  NamedTensors checkpoint_state() const override;
  // Each rank restores the state of the parameters it owns.
  void restore_state(const SafetensorsReader& state) override { mine_->restore_state(state); }
  NamedTensors state_layout(const std::string& name, const torch::Tensor& param) const override {
    return mine_->state_layout(name, param);
  }

  // The parameters this rank updates.
  Named owned() const;

 private:
  void broadcast_updated_weights();
  Communicator& comm_;
  Named trained_;
  std::vector<int> owner_;
  std::unique_ptr<Optimizer> mine_;  // over owned()
};

}  // namespace gpt2ft
