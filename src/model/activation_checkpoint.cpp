// Activation checkpointing as a custom autograd Function.
#include "gpt2ft/model/activation_checkpoint.h"

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <optional>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/core/rng_state.h"
#include "gpt2ft/model/gpt2.h"

namespace gpt2ft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autocast's weight-cast cache off for a scope.
class AutocastCacheOff {
 public:
  AutocastCacheOff() : prev_(at::autocast::is_autocast_cache_enabled()) { at::autocast::set_autocast_cache_enabled(false); }
  ~AutocastCacheOff() { at::autocast::set_autocast_cache_enabled(prev_); }

 private:
  bool prev_;
};

struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  // The block is passed by address: it outlives the graph (it belongs to the model).
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, int64_t block_address) {
    const c10::Device device = x.device();
    ctx->saved_data["block"] = block_address;
    ctx->saved_data["cpu_rng"] = get_rng_state(c10::kCPU);
    if (device.is_cuda()) ctx->saved_data["device_rng"] = get_rng_state(device);
    const bool autocast = at::autocast::is_autocast_enabled(device.type());
    ctx->saved_data["autocast"] = autocast;
    ctx->saved_data["autocast_dtype"] = at::autocast::get_autocast_dtype(device.type());
    ctx->save_for_backward({x});
    AutocastCacheOff cache_off;
    return reinterpret_cast<BlockImpl*>(block_address)->forward(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const torch::Tensor x = ctx->get_saved_variables()[0];
    const c10::Device device = x.device();
    auto* block = reinterpret_cast<BlockImpl*>(ctx->saved_data["block"].toInt());

    // Recompute with the forward pass's RNG state, then put the current state back.
    const torch::Tensor cpu_now = get_rng_state(c10::kCPU);
    std::optional<torch::Tensor> device_now;
    if (device.is_cuda()) device_now = get_rng_state(device);
    set_rng_state(c10::kCPU, ctx->saved_data["cpu_rng"].toTensor());
    if (device.is_cuda()) set_rng_state(device, ctx->saved_data["device_rng"].toTensor());

    torch::Tensor input = x.detach().requires_grad_(x.requires_grad());
    torch::Tensor output;
    {
      torch::AutoGradMode grad_on(true);
      const auto dtype = ctx->saved_data["autocast"].toBool() ? ctx->saved_data["autocast_dtype"].toScalarType()
                                                              : c10::kFloat;
      AutocastGuard autocast(device.type(), dtype);
      AutocastCacheOff cache_off;
      output = block->forward(input);
    }
    set_rng_state(c10::kCPU, cpu_now);
    if (device_now) set_rng_state(device, *device_now);

    torch::autograd::backward({output}, {grad_outputs[0]});
    return {input.requires_grad() ? input.grad() : torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor checkpointed_block_forward(BlockImpl& block, const torch::Tensor& x) {
  return CheckpointFunction::apply(x, reinterpret_cast<int64_t>(&block));
}

}  // namespace gpt2ft
