// AdamW, fused and unfused.
#include "gpt2ft/train/adamw.h"

#include <cmath>

#include <torch/torch.h>

namespace gpt2ft {

AdamW::AdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, AdamWOptions options)
    : options_(options) {
  groups_.resize(2);
  groups_[0].weight_decay = options.weight_decay;  // weights and embeddings
  groups_[1].weight_decay = 0.0;                   // biases and LayerNorm parameters
  for (const auto& [name, p] : named_params) {
    if (!p.requires_grad()) continue;
    Group& g = groups_[p.dim() >= 2 ? 0 : 1];
    g.names.push_back(name);
    g.params.push_back(p);
    g.exp_avg.push_back(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    g.exp_avg_sq.push_back(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    g.steps.push_back(torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat).device(p.device())));
  }
}

std::vector<torch::Tensor> gradients_of(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> out;
  for (const auto& p : params) {
    if (!p.grad().defined()) const_cast<torch::Tensor&>(p).mutable_grad() = torch::zeros_like(p);
    out.push_back(p.grad());
  }
  return out;
}

void clear_gradients(const std::vector<torch::Tensor>& params) {
  for (const auto& p : params) {
    if (p.grad().defined()) const_cast<torch::Tensor&>(p).mutable_grad().reset();  // set_to_none, like PyTorch
  }
}

void AdamW::step_unfused(Group& g, double lr) {
  // torch.optim.AdamW's single-tensor update, op for op.
  const double beta1 = options_.betas[0], beta2 = options_.betas[1];
  // A group's parameters always step together: one read of the count per group, not per tensor.
  const double step = g.steps[0].item<double>() + 1;
  for (size_t i = 0; i < g.params.size(); ++i) {
    torch::Tensor& p = g.params[i];
    const torch::Tensor grad = p.grad().defined() ? p.grad() : torch::zeros_like(p);
    g.steps[i].add_(1);
    p.mul_(1 - lr * g.weight_decay);
    g.exp_avg[i].lerp_(grad, 1 - beta1);
    g.exp_avg_sq[i].mul_(beta2).addcmul_(grad, grad, 1 - beta2);
    const double bias_correction1 = 1 - std::pow(beta1, step);
    const double bias_correction2 = 1 - std::pow(beta2, step);
    const double step_size = lr / bias_correction1;
    const torch::Tensor denom = (g.exp_avg_sq[i].sqrt() / std::sqrt(bias_correction2)).add_(options_.eps);
    p.addcdiv_(g.exp_avg[i], denom, -step_size);
  }
}

void AdamW::step(double lr, const std::optional<torch::Tensor>& grad_scale, const std::optional<torch::Tensor>& found_inf) {
  torch::NoGradGuard no_grad;
  for (auto& g : groups_) {
    if (g.params.empty()) continue;
    if (!options_.fused) {
      step_unfused(g, lr);
      continue;
    }
    std::vector<torch::Tensor> grads;
    for (auto& p : g.params) {
      if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
      grads.push_back(p.grad());
    }
    // As torch.optim.AdamW(fused=True): count the step, then take it back if it was skipped.
    torch::_foreach_add_(g.steps, 1);
    at::_fused_adamw_(g.params, grads, g.exp_avg, g.exp_avg_sq, /*max_exp_avg_sqs=*/{}, g.steps, lr,
                      options_.betas[0], options_.betas[1], g.weight_decay, options_.eps, /*amsgrad=*/false,
                      /*maximize=*/false, grad_scale, found_inf);
    if (found_inf) {
      for (auto& s : g.steps) s.sub_(*found_inf);
    }
  }
}

}  // namespace gpt2ft
