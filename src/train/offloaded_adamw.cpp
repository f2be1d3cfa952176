// AdamW on the host, fed and drained bucket by bucket.
#include "gpt2ft/train/offloaded_adamw.h"

#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/torch.h>

#include "gpt2ft/core/error.h"
#include "gpt2ft/core/host_memory.h"

namespace gpt2ft {

struct OffloadedAdamW::Bucket {
  std::vector<size_t> members;  // indices into params_
  torch::Tensor host_grads;     // (numel,) float32, pinned on CUDA
  std::vector<int64_t> offsets; // of each member in host_grads
  std::unique_ptr<AdamW> adamw; // over the members' host copies
  std::optional<c10::Event> copied_in;
  // Where each member's host copy sits in adamw: (group, index), by member position.
  std::vector<std::pair<size_t, size_t>> slot;

  torch::Tensor& host_copy(size_t j) { return adamw->groups()[slot[j].first].params[slot[j].second]; }
};

void check_host_memory_for_offload(int64_t trained_parameters) {
  require_host_memory(16.0 * static_cast<double>(trained_parameters),
                      "train.optimizer_offload \"cpu\" for " + std::to_string(trained_parameters) +
                          " trained parameters (16 bytes each: a float32 copy, AdamW's two moments and the gradient "
                          "buffer)",
                      "free host memory, shard the optimizer over GPUs (distributed.shard_optimizer) or set "
                      "train.optimizer_offload \"none\"");
}

OffloadedAdamW::OffloadedAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
                               AdamWOptions options, c10::Device device, int64_t bucket_bytes)
    : device_(device) {
  for (const auto& [name, p] : named_params) {
    if (p.requires_grad()) params_.emplace_back(name, p);
  }
  int64_t trained = 0;
  for (const auto& [name, p] : params_) trained += p.numel();
  check_host_memory_for_offload(trained);
  options.fused = true;  // the host kernel: vectorised and multi-threaded
  const auto host = torch::TensorOptions().dtype(torch::kFloat).pinned_memory(device.is_cuda());
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size();) {  // consecutive parameters, about bucket_bytes each
    auto b = std::make_unique<Bucket>();
    int64_t numel = 0;
    while (i < params_.size() && (b->members.empty() || 4 * numel < bucket_bytes)) {
      b->offsets.push_back(numel);
      numel += params_[i].second.numel();
      b->members.push_back(i++);
    }
    b->host_grads = torch::empty({numel}, host);
    std::vector<std::pair<std::string, torch::Tensor>> copies;
    for (const size_t m : b->members) {
      const auto& [name, p] = params_[m];
      copies.emplace_back(name, torch::empty(p.sizes(), host).requires_grad_(true));
    }
    b->adamw = std::make_unique<AdamW>(copies, options);
    for (size_t j = 0; j < b->members.size(); ++j) {  // AdamW groups them by decay, in order
      const auto& groups = b->adamw->groups();
      for (size_t g = 0; g < groups.size(); ++g) {
        for (size_t k = 0; k < groups[g].names.size(); ++k) {
          if (groups[g].names[k] == params_[b->members[j]].first) b->slot.emplace_back(g, k);
        }
      }
    }
    buckets_.push_back(std::move(b));
  }
  refresh_host_weights();
}

OffloadedAdamW::~OffloadedAdamW() = default;

void OffloadedAdamW::refresh_host_weights() {
  torch::NoGradGuard no_grad;
  for (auto& b : buckets_) {
    for (size_t j = 0; j < b->members.size(); ++j) b->host_copy(j).copy_(params_[b->members[j]].second);
  }
}

void OffloadedAdamW::step(double lr, const std::optional<torch::Tensor>& found_inf) {
  torch::NoGradGuard no_grad;
  if (found_inf && found_inf->item<float>() != 0.0f) return;  // skipped step (float16): one read of the flag
  const bool cuda = device_.is_cuda();
  std::optional<c10::impl::VirtualGuardImpl> impl;
  std::optional<c10::Stream> compute, copy;
  if (cuda) {
    impl.emplace(device_.type());
    compute = impl->getStream(device_);
    copy = impl->getStreamFromGlobalPool(device_, /*isHighPriority=*/false);
    c10::Event grads_final(device_.type());
    grads_final.record(*compute);  // unscaled and clipped on the compute stream
    grads_final.block(*copy);
  }
  // Device -> host: every bucket's gradients, queued at once.
  for (auto& b : buckets_) {
    std::optional<c10::StreamGuard> on_copy;
    if (cuda) on_copy.emplace(*copy);
    for (size_t k = 0; k < b->members.size(); ++k) {
      const torch::Tensor& grad = params_[b->members[k]].second.grad();
      if (!grad.defined()) continue;
      b->host_grads.narrow(0, b->offsets[k], grad.numel()).copy_(grad.reshape({-1}), /*non_blocking=*/cuda);
    }
    if (cuda) {
      b->copied_in.emplace(device_.type());
      b->copied_in->record(*copy);
    }
  }
  // Host step per bucket as its gradients arrive, then its weights back to the device.
  for (auto& b : buckets_) {
    if (b->copied_in) b->copied_in->synchronize();
    for (size_t j = 0; j < b->members.size(); ++j) {
      const torch::Tensor& p = params_[b->members[j]].second;
      // A parameter without a gradient this step has none on the host either (AdamW skips it).
      torch::Tensor& host_grad = b->host_copy(j).mutable_grad();
      if (p.grad().defined()) host_grad = b->host_grads.narrow(0, b->offsets[j], p.numel()).view(p.sizes());
      else host_grad.reset();
    }
    b->adamw->step(lr);
    std::optional<c10::StreamGuard> on_copy;
    if (cuda) on_copy.emplace(*copy);
    for (size_t j = 0; j < b->members.size(); ++j) {
      params_[b->members[j]].second.copy_(b->host_copy(j), /*non_blocking=*/cuda);
    }
  }
  if (cuda) {  // the next forward pass reads the updated weights
    c10::Event weights_back(device_.type());
    weights_back.record(*copy);
    weights_back.block(*compute);
  }
}

NamedTensors OffloadedAdamW::checkpoint_state() const {
  NamedTensors out;
  for (const auto& b : buckets_) {
    for (auto& item : b->adamw->checkpoint_state()) out.push_back(std::move(item));
  }
  return out;
}

void OffloadedAdamW::restore_state(const SafetensorsReader& state) {
  for (auto& b : buckets_) b->adamw->restore_state(state);
  refresh_host_weights();
}

int64_t OffloadedAdamW::host_bytes() const {
  int64_t bytes = 0;
  for (const auto& b : buckets_) {
    bytes += b->host_grads.nbytes();
    for (const auto& [key, t] : b->adamw->checkpoint_state()) bytes += t.nbytes();
    for (const auto& g : b->adamw->groups()) {
      for (const auto& p : g.params) bytes += p.nbytes();
    }
  }
  return bytes;
}

}  // namespace gpt2ft
