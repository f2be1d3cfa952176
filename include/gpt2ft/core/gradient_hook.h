// A callback after autograd has accumulated a parameter's gradient into .grad (libtorch's
// counterpart of Tensor.register_post_accumulate_grad_hook). A parameter has one such slot:
// setting a hook replaces the one before.
#pragma once

#include <functional>

#include <torch/types.h>

namespace gpt2ft {

void set_gradient_hook(const torch::Tensor& param, std::function<void()> on_accumulated);
void clear_gradient_hook(const torch::Tensor& param);

}  // namespace gpt2ft
