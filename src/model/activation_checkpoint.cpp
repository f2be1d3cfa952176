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

// Inputs: the block's input x, the block's trained parameters, and the block's address. The
// parameters are inputs so that the output needs a gradient whenever any of them is trained,
// also when x needs none (frozen embeddings or frozen blocks before this one); their
// gradients are returned to autograd, which accumulates them as for any other use.
struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  // The block is passed by address: it outlives the graph (it belongs to the model).
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::TensorList params,
                               std::optional<torch::Tensor> mask, std::optional<torch::Tensor> cu_seqlens,
                               int64_t max_len, int64_t block_address) {
    const c10::Device device = x.device();
    const DocumentAttention docs{mask.value_or(torch::Tensor()), cu_seqlens.value_or(torch::Tensor()), max_len};
    ctx->saved_data["block"] = block_address;
    ctx->saved_data["mask"] = docs.mask;  // no gradient: kept as they are
    ctx->saved_data["cu_seqlens"] = docs.cu_seqlens;
    ctx->saved_data["max_len"] = max_len;
    ctx->saved_data["cpu_rng"] = get_rng_state(c10::kCPU);
    if (device.is_cuda()) ctx->saved_data["device_rng"] = get_rng_state(device);
    const bool autocast = at::autocast::is_autocast_enabled(device.type());
    ctx->saved_data["autocast"] = autocast;
    ctx->saved_data["autocast_dtype"] = at::autocast::get_autocast_dtype(device.type());
    std::vector<torch::Tensor> saved = {x};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    AutocastCacheOff cache_off;
    return reinterpret_cast<BlockImpl*>(block_address)->forward(x, docs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const c10::Device device = x.device();
    auto* block = reinterpret_cast<BlockImpl*>(ctx->saved_data["block"].toInt());
    const auto tensor = [&](const char* key) {
      return ctx->saved_data[key].isTensor() ? ctx->saved_data[key].toTensor() : torch::Tensor();
    };
    const DocumentAttention docs{tensor("mask"), tensor("cu_seqlens"), ctx->saved_data["max_len"].toInt()};

    // Recompute with the forward pass's RNG state, then put the current state back.
    const torch::Tensor cpu_now = get_rng_state(c10::kCPU);
    std::optional<torch::Tensor> device_now;
    if (device.is_cuda()) device_now = get_rng_state(device);
    set_rng_state(c10::kCPU, ctx->saved_data["cpu_rng"].toTensor());
    if (device.is_cuda()) set_rng_state(device, ctx->saved_data["device_rng"].toTensor());

    const bool x_grad = ctx->needs_input_grad(0);
    torch::Tensor input = x.detach().requires_grad_(x_grad);
    torch::Tensor output;
    {
      torch::AutoGradMode grad_on(true);
      const auto dtype = ctx->saved_data["autocast"].toBool() ? ctx->saved_data["autocast_dtype"].toScalarType()
                                                              : c10::kFloat;
      AutocastGuard autocast(device.type(), dtype);
      AutocastCacheOff cache_off;
      output = block->forward(input, docs);
    }
    set_rng_state(c10::kCPU, cpu_now);
    if (device_now) set_rng_state(device, *device_now);

    // d output -> d x (when wanted) and d parameters (saved[1..]), returned, not accumulated here.
    variable_list wrt;
    if (x_grad) wrt.push_back(input);
    wrt.insert(wrt.end(), saved.begin() + 1, saved.end());
    variable_list grads = torch::autograd::grad({output}, wrt, {grad_outputs[0]}, /*retain_graph=*/false,
                                                /*create_graph=*/false, /*allow_unused=*/true);
    variable_list result;
    result.push_back(x_grad ? grads[0] : torch::Tensor());
    result.insert(result.end(), grads.begin() + (x_grad ? 1 : 0), grads.end());
    result.emplace_back();  // the mask
    result.emplace_back();  // the documents' starts
    result.emplace_back();  // their longest length
    result.emplace_back();  // the block's address
    return result;
  }
};

}  // namespace

torch::Tensor checkpointed_block_forward(BlockImpl& block, const torch::Tensor& x, const DocumentAttention& docs) {
  std::vector<torch::Tensor> trained;
  for (const auto& p : block.parameters()) {
    if (p.requires_grad()) trained.push_back(p);
  }
  if (!x.requires_grad() && trained.empty()) return block.forward(x, docs);  // nothing to differentiate
  const auto optional = [](const torch::Tensor& t) { return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt; };
  return CheckpointFunction::apply(x, torch::TensorList(trained), optional(docs.mask), optional(docs.cu_seqlens),
                                   docs.max_len, reinterpret_cast<int64_t>(&block));
}

}  // namespace gpt2ft
