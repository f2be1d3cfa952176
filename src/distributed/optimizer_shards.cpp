// ZeRO-1 partition, weight broadcast and state gathering.
#include "gpt2ft/distributed/optimizer_shards.h"

#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <numeric>


namespace gpt2ft {

std::vector<int> partition_parameters(const std::vector<int64_t>& numels, int world_size) {
  std::vector<size_t> order(numels.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return numels[a] > numels[b]; });
  std::vector<int64_t> load(static_cast<size_t>(world_size), 0);
  std::vector<int> owner(numels.size(), 0);
  for (const size_t i : order) {
    const int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i] = r;
    load[static_cast<size_t>(r)] += numels[i];
  }
  return owner;
}

namespace {

std::vector<int> owners_of(const OptimizerShards::Named& trained, int world_size) {
  std::vector<int64_t> numels;
  for (const auto& [name, p] : trained) numels.push_back(p.numel());
  return partition_parameters(numels, world_size);
}

}  // namespace

OptimizerShards::OptimizerShards(Communicator& comm, Named trained, const MakeShardOptimizer& make)
    : comm_(comm), trained_(std::move(trained)), owner_(owners_of(trained_, comm_.world_size())), mine_(make(owned())) {}

void OptimizerShards::step(double lr, const GradientScaling& scaling) {
  mine_->step(lr, scaling);
  broadcast_updated_weights();
}

OptimizerShards::Named OptimizerShards::owned() const {
  Named out;
  for (size_t i = 0; i < trained_.size(); ++i) {
    if (owner_[i] == comm_.rank()) out.push_back(trained_[i]);
  }
  return out;
}

void OptimizerShards::broadcast_updated_weights() {
  torch::NoGradGuard no_grad;
  for (int r = 0; r < comm_.world_size(); ++r) {
    // One flat buffer per owner: its parameters, concatenated.
    std::vector<torch::Tensor> params;
    for (size_t i = 0; i < trained_.size(); ++i) {
      if (owner_[i] == r) params.push_back(trained_[i].second);
    }
    if (params.empty()) continue;
    int64_t total = 0;
    for (const auto& p : params) total += p.numel();
    torch::Tensor flat = r == comm_.rank() ? torch::cat([&] {
      std::vector<torch::Tensor> views;
      for (const auto& p : params) views.push_back(p.reshape({-1}));
      return views;
    }())
                                           : torch::empty({total}, params.front().options());
    comm_.broadcast_({flat}, r, "updated weights of rank " + std::to_string(r));
    if (r == comm_.rank()) continue;
    int64_t offset = 0;
    for (auto& p : params) {
      p.copy_(flat.narrow(0, offset, p.numel()).view(p.sizes()));
      offset += p.numel();
    }
  }
}

NamedTensors OptimizerShards::checkpoint_state() const {
  std::map<std::string, torch::Tensor> local;  // this rank's state by key
  for (auto& [key, t] : mine_->checkpoint_state()) local.emplace(key, t);
  NamedTensors out;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < trained_.size(); ++i) {
    const auto& [name, p] = trained_[i];
    const bool own = owner_[i] == comm_.rank();
    for (auto& [key, empty] : mine_->state_layout(name, p)) {
      // Collectives run on the training device, wherever the owner keeps its state.
      torch::Tensor t = own ? local.at(key).to(p.device()) : empty.to(p.device());
      comm_.broadcast_({t}, owner_[i], "optimizer state of " + name);
      if (comm_.is_main()) out.emplace_back(key, t.cpu());
    }
  }
  return out;
}

}  // namespace gpt2ft
