// Post-accumulate gradient hooks through autograd's internal slot.
#include "gpt2ft/core/gradient_hook.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

namespace gpt2ft {
namespace {

struct CallbackHook : torch::autograd::PostAccumulateGradHook {
  std::function<void()> callback;
  explicit CallbackHook(std::function<void()> f) : callback(std::move(f)) {}
  void operator()(const torch::autograd::Variable&) override { callback(); }
};

}  // namespace

void set_gradient_hook(const torch::Tensor& param, std::function<void()> on_accumulated) {
  torch::autograd::impl::set_post_acc_grad_hooks(param, std::make_unique<CallbackHook>(std::move(on_accumulated)));
}

void clear_gradient_hook(const torch::Tensor& param) { torch::autograd::impl::set_post_acc_grad_hooks(param, nullptr); }

}  // namespace gpt2ft
