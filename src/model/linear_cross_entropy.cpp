// Chunked output projection + cross-entropy, gradients computed in the forward pass.
#include "gpt2ft/model/linear_cross_entropy.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

namespace gpt2ft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor hidden, torch::Tensor weight, torch::Tensor targets,
                               int64_t chunk_rows, bool want_grad_hidden, bool want_grad_weight) {
    const bool want_grad = want_grad_hidden || want_grad_weight;
    const int64_t N = hidden.size(0), C = hidden.size(1), V = weight.size(0);
    const auto f32 = hidden.options().dtype(torch::kFloat);
    torch::Tensor loss_sum = torch::zeros({}, f32);
    torch::Tensor grad_hidden, grad_weight;
    if (want_grad_hidden) grad_hidden = torch::empty({N, C}, f32);                                    // (N, C)
    if (want_grad_weight) grad_weight = torch::zeros({V, C}, weight.options().dtype(torch::kFloat));  // (V, C)
    for (int64_t start = 0; start < N; start += chunk_rows) {
      const int64_t n = std::min(chunk_rows, N - start);
      const torch::Tensor h = hidden.narrow(0, start, n);                  // (n, C)
      const torch::Tensor t = targets.narrow(0, start, n).unsqueeze(1);    // (n, 1)
      const torch::Tensor logits = torch::matmul(h, weight.t());           // (n, V), autocast's dtype
      torch::Tensor z = logits.to(torch::kFloat);                          // (n, V) float32 (logits itself in fp32)
      const torch::Tensor lse = torch::logsumexp(z, 1, /*keepdim=*/true);  // (n, 1)
      loss_sum += (lse - z.gather(1, t)).sum();
      if (!want_grad) continue;
      // d loss / d logits = (softmax - onehot) / N, built in z's storage without the 1/N,
      // which is applied to the float32 results instead: under float16 autocast the cast
      // would otherwise flush small probabilities / N to zero (eager avoids that only
      // because the loss scale has already multiplied them).
      z.sub_(lse).exp_();
      z.scatter_add_(1, t, torch::full({n, 1}, -1.0f, f32));
      const torch::Tensor g = z.to(logits.scalar_type());  // what the matmuls take, as in eager
      const double inv_n = 1.0 / static_cast<double>(N);
      const bool fp32 =
          g.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat && h.scalar_type() == torch::kFloat;
      // Under autocast the matmuls run in the 16-bit type and the sums stay in float32.
      if (want_grad_hidden) {
        torch::Tensor gh = grad_hidden.narrow(0, start, n);  // (n, C)
        if (fp32)
          torch::addmm_out(gh, gh, g, weight, /*beta=*/0, /*alpha=*/inv_n);
        else
          gh.copy_(torch::matmul(g, weight)).mul_(inv_n);
      }
      if (want_grad_weight) {  // not for frozen (tied) embeddings
        if (fp32)
          grad_weight.addmm_(g.t(), h, /*beta=*/1, /*alpha=*/inv_n);
        else
          grad_weight.add_(torch::matmul(g.t(), h), inv_n);
      }
    }
    ctx->save_for_backward({grad_hidden, grad_weight});
    ctx->saved_data["hidden_dtype"] = hidden.scalar_type();
    ctx->saved_data["weight_dtype"] = weight.scalar_type();
    return loss_sum / static_cast<double>(N);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    TORCH_CHECK(saved[0].defined() || saved[1].defined(),
                "linear_cross_entropy: backward through a loss computed without gradients");
    const torch::Tensor& go = grad_outputs[0];  // () the incoming gradient (loss scale / accumulation)
    // The saved gradients are used once: scale them in place.
    auto scaled = [&](torch::Tensor grad, const char* dtype_key) {
      if (!grad.defined()) return torch::Tensor();
      return grad.mul_(go).to(ctx->saved_data[dtype_key].toScalarType());
    };
    return {scaled(saved[0], "hidden_dtype"),
            scaled(saved[1], "weight_dtype"),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor()};
  }
};

}  // namespace

torch::Tensor linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                   const torch::Tensor& targets, int64_t chunk_rows) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "linear_cross_entropy: hidden (N, C) and weight (V, C) expected, got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "linear_cross_entropy: targets (N) expected");
  if (chunk_rows <= 0) chunk_rows = std::max<int64_t>(1, (64ll << 20) / (4 * weight.size(0)));
  const bool grad = torch::GradMode::is_enabled();
  return LinearCrossEntropyFunction::apply(hidden, weight, targets, chunk_rows, grad && hidden.requires_grad(),
                                           grad && weight.requires_grad());
}

}  // namespace gpt2ft
