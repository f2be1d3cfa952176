// AdamW, fused and unfused.
#include "gpt2ft/optim/adamw.h"

#include <cmath>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/error.h"
#include "gpt2ft/optim/adamw_8bit.h"

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
    if (p.grad().defined()) out.push_back(p.grad());
  }
  return out;
}

void clear_gradients(const std::vector<torch::Tensor>& params) {
  for (const auto& p : params) {
    if (p.grad().defined()) const_cast<torch::Tensor&>(p).mutable_grad().reset();  // set_to_none, like PyTorch
  }
}

void AdamW::step_unfused(Group& g, const std::vector<size_t>& with_grad, double lr) {
  // torch.optim.AdamW's single-tensor update, op for op. Everything it allocates (the step
  // counts read on the host, one buffer for the largest tensor's denominator) is allocated
  // before the first tensor changes, so running out of memory leaves every tensor as it was.
  const double beta1 = options_.betas[0], beta2 = options_.betas[1];
  // The step counts of the tensors that step, read in one host sync for the group.
  std::vector<torch::Tensor> counts;
  int64_t largest = 0;
  for (const size_t i : with_grad) {
    counts.push_back(g.steps[i]);
    largest = std::max(largest, g.params[i].numel());
  }
  const torch::Tensor host_counts = torch::stack(counts).to(torch::kCPU, torch::kDouble);  // (n,)
  const double* count = host_counts.data_ptr<double>();
  torch::Tensor denom_buffer = torch::empty({largest}, g.params[with_grad.front()].options());  // (largest)
  for (size_t k = 0; k < with_grad.size(); ++k) {
    const size_t i = with_grad[k];
    torch::Tensor& p = g.params[i];
    const torch::Tensor& grad = p.grad();
    const double step = count[k] + 1;
    g.steps[i].add_(1);
    p.mul_(1 - lr * g.weight_decay);
    g.exp_avg[i].lerp_(grad, 1 - beta1);
    g.exp_avg_sq[i].mul_(beta2).addcmul_(grad, grad, 1 - beta2);
    const double bias_correction1 = 1 - std::pow(beta1, step);
    const double bias_correction2 = 1 - std::pow(beta2, step);
    const double step_size = lr / bias_correction1;
    torch::Tensor denom = denom_buffer.narrow(0, 0, p.numel()).view(p.sizes());  // the same ops, in place
    at::sqrt_out(denom, g.exp_avg_sq[i]).div_(std::sqrt(bias_correction2)).add_(options_.eps);
    p.addcdiv_(g.exp_avg[i], denom, -step_size);
  }
}

void AdamW::step(double lr, const GradientScaling& scaling) {
  torch::NoGradGuard no_grad;
  const std::optional<torch::Tensor>& found_inf = scaling.found_inf;
  if (!options_.fused && found_inf && found_inf->item<float>() != 0.0f) return;  // unfused: one sync
  for (auto& g : groups_) {
    std::vector<size_t> with_grad;  // the tensors that got a gradient this step
    for (size_t i = 0; i < g.params.size(); ++i) {
      if (g.params[i].grad().defined()) with_grad.push_back(i);
    }
    if (with_grad.empty()) continue;
    if (!options_.fused) {
      step_unfused(g, with_grad, lr);
      continue;
    }
    std::vector<torch::Tensor> params, grads, exp_avg, exp_avg_sq, steps;
    for (const size_t i : with_grad) {
      params.push_back(g.params[i]);
      grads.push_back(g.params[i].grad());
      exp_avg.push_back(g.exp_avg[i]);
      exp_avg_sq.push_back(g.exp_avg_sq[i]);
      steps.push_back(g.steps[i]);
    }
    // As torch.optim.AdamW(fused=True): count the step, then take it back if it was skipped.
    torch::_foreach_add_(steps, 1);
    at::_fused_adamw_(params, grads, exp_avg, exp_avg_sq, /*max_exp_avg_sqs=*/{}, steps, lr, options_.betas[0],
                      options_.betas[1], g.weight_decay, options_.eps, /*amsgrad=*/false,
                      /*maximize=*/false, /*grad_scale=*/std::nullopt, found_inf);
    if (found_inf) torch::_foreach_add_(steps, *found_inf, -1);  // one launch, not one per tensor
  }
}

NamedTensors AdamW::checkpoint_state() const {
  NamedTensors tensors;
  for (const auto& g : groups_) {
    for (size_t i = 0; i < g.params.size(); ++i) {
      tensors.emplace_back("adamw.exp_avg." + g.names[i], g.exp_avg[i]);
      tensors.emplace_back("adamw.exp_avg_sq." + g.names[i], g.exp_avg_sq[i]);
      tensors.emplace_back("adamw.step." + g.names[i], g.steps[i]);
    }
  }
  return tensors;
}

void AdamW::restore_state(const SafetensorsReader& state) {
  const std::string hint = "the checkpoint is damaged, or the set of trained parameters changed: model.freeze_* must "
                           "match the run's";
  int64_t dequantized = 0;  // tensors whose state was 8-bit AdamW's (train.optimizer changed)
  for (auto& g : groups_) {
    for (size_t i = 0; i < g.params.size(); ++i) {
      const auto saved = state.contains("adamw.step." + g.names[i]) ? std::nullopt : saved_moments(state, g.names[i]);
      if (saved) {  // 8-bit AdamW's moments, dequantized
        if (saved->exp_avg.numel() != g.params[i].numel()) {
          throw Error(state.path().string() + ": the optimizer state of " + g.names[i] + " holds " +
                      std::to_string(saved->exp_avg.numel()) + " values, the parameter " +
                      std::to_string(g.params[i].numel()) + "; the checkpoint is of another model");
        }
        g.exp_avg[i].copy_(saved->exp_avg.view(g.exp_avg[i].sizes()));
        g.exp_avg_sq[i].copy_(saved->exp_avg_sq.view(g.exp_avg_sq[i].sizes()));
        g.steps[i].copy_(saved->step);
        ++dequantized;
      } else {
        state.load_into("adamw.exp_avg." + g.names[i], g.exp_avg[i], hint);
        state.load_into("adamw.exp_avg_sq." + g.names[i], g.exp_avg_sq[i], hint);
        state.load_into("adamw.step." + g.names[i], g.steps[i], hint);
      }
      // Finite is checked on reading; the second moment is a mean of squares and the step a count.
      if ((g.exp_avg_sq[i] < 0).any().item<bool>() || (g.steps[i] < 0).any().item<bool>()) {
        throw Error(state.path().string() + ": adamw state of " + g.names[i] + " holds a negative " +
                    ((g.steps[i] < 0).any().item<bool>() ? "step count" : "second moment (exp_avg_sq)") +
                    "; the checkpoint is damaged. Resume from an earlier one");
      }
    }
  }
  if (dequantized > 0) {
    spdlog::info("AdamW resumed from 8-bit AdamW's state: the moments of {} tensor(s) dequantized to float32",
                 dequantized);
  }
}

NamedTensors adamw_state(const AdamW& optimizer) { return optimizer.checkpoint_state(); }

NamedTensors adamw_state_layout(const std::string& name, const torch::Tensor& p) {
  return {{"adamw.exp_avg." + name, torch::empty_like(p)},
          {"adamw.exp_avg_sq." + name, torch::empty_like(p)},
          {"adamw.step." + name, torch::empty({}, p.options().dtype(torch::kFloat))}};
}

NamedTensors AdamW::state_layout(const std::string& name, const torch::Tensor& p) const {
  return adamw_state_layout(name, p);
}

}  // namespace gpt2ft
