// Chunked output projection + cross-entropy, gradients computed in the forward pass.
#include "gpt2ft/model/linear_cross_entropy.h"

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

namespace gpt2ft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// out = beta * out + alpha * (a @ b), the product summed in float32 into the float32 `out`.
// On CUDA 16-bit operands go straight into the float32 output (cuBLAS accumulates in float32
// anyway); elsewhere the 16-bit product is formed first, as the CPU kernels require.
void addmm_into_float32(torch::Tensor& out, const torch::Tensor& a, const torch::Tensor& b, double beta, double alpha) {
  if (a.scalar_type() == torch::kFloat && b.scalar_type() == torch::kFloat) {
    out.addmm_(a, b, beta, alpha);
  } else if (out.is_cuda()) {
    at::addmm_out(out, out, a, b, torch::kFloat, beta, alpha);
  } else if (beta == 0) {
    out.copy_(torch::matmul(a, b)).mul_(alpha);
  } else {
    out.mul_(beta).add_(torch::matmul(a, b), alpha);
  }
}

struct LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor hidden, torch::Tensor weight, torch::Tensor targets,
                               int64_t chunk_rows, double divisor, bool want_grad_hidden, bool want_grad_weight) {
    const bool want_grad = want_grad_hidden || want_grad_weight;
    const int64_t N = hidden.size(0), C = hidden.size(1), V = weight.size(0);
    const auto f32 = hidden.options().dtype(torch::kFloat);
    // The matmuls' dtype is autocast's when it is on (as for the eager lm_head); the weight is
    // cast once here, not once per chunk (autocast does not cache casts of a transposed view).
    const auto device_type = hidden.device().type();
    const c10::ScalarType compute = at::autocast::is_autocast_enabled(device_type)
                                        ? at::autocast::get_autocast_dtype(device_type)
                                        : weight.scalar_type();
    // The casts below are explicit: autocast is off inside.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
    const torch::Tensor w = weight.to(compute);  // (V, C)
    // The gradients' matmuls on the CPU under 16-bit autocast take the float32 d logits and
    // weight as they are: 16-bit products would be summed into the float32 d weight through a
    // (V, C) 16-bit product and its float32 conversion (6VC bytes: 232 MiB for GPT-2), which
    // CUDA's mixed-dtype addmm does not need.
    const bool float32_gradients =
        !hidden.is_cuda() && compute != torch::kFloat && weight.scalar_type() == torch::kFloat;
    torch::Tensor loss_sum = torch::zeros({}, f32);
    torch::Tensor grad_hidden, grad_weight;
    if (want_grad_hidden) grad_hidden = torch::empty({N, C}, f32);                                    // (N, C)
    if (want_grad_weight) grad_weight = torch::zeros({V, C}, weight.options().dtype(torch::kFloat));  // (V, C)
    const double inv_n = 1.0 / divisor;
    for (int64_t start = 0; start < N; start += chunk_rows) {
      const int64_t n = std::min(chunk_rows, N - start);
      const torch::Tensor h = hidden.narrow(0, start, n).to(compute);   // (n, C)
      const torch::Tensor t = targets.narrow(0, start, n).unsqueeze(1); // (n, 1)
      // (n, V) float32; the compute-dtype logits are dropped as soon as they are converted.
      torch::Tensor z = torch::matmul(h, w.t()).to(torch::kFloat);
      // log-sum-exp as at::logsumexp computes it (max + log sum exp(z - max)), but in z's own
      // storage: at::logsumexp would hold a second (n, V) float32 temporary, doubling the
      // loss's peak.
      const torch::Tensor target_logit = z.gather(1, t);              // (n, 1)
      const torch::Tensor row_max = z.amax(1, /*keepdim=*/true);      // (n, 1)
      z.sub_(row_max).exp_();                                         // (n, V) exp(z - max)
      const torch::Tensor row_sum = z.sum(1, /*keepdim=*/true);       // (n, 1)
      loss_sum += (row_sum.log() + row_max - target_logit).sum();
      if (!want_grad) continue;
      // d loss / d logits = (softmax - onehot) / N, built in z's storage without the 1/N,
      // which is applied to the float32 results instead: under float16 the cast would
      // otherwise flush small probabilities / N to zero (eager avoids that only because the
      // loss scale has already multiplied them).
      z.div_(row_sum);
      z.scatter_add_(1, t, torch::full({n, 1}, -1.0f, f32));
      torch::Tensor gh = want_grad_hidden ? grad_hidden.narrow(0, start, n) : torch::Tensor();  // (n, C)
      if (float32_gradients) {
        if (want_grad_hidden) addmm_into_float32(gh, z, weight, /*beta=*/0, inv_n);
        if (want_grad_weight) addmm_into_float32(grad_weight, z.t(), hidden.narrow(0, start, n).to(torch::kFloat), 1, inv_n);
        continue;
      }
      const torch::Tensor g = z.to(compute);  // (n, V), what the matmuls take, as in eager
      if (want_grad_hidden) addmm_into_float32(gh, g, w, /*beta=*/0, inv_n);
      if (want_grad_weight) addmm_into_float32(grad_weight, g.t(), h, /*beta=*/1, inv_n);  // not for frozen weights
    }
    ctx->save_for_backward({grad_hidden, grad_weight});
    ctx->saved_data["hidden_dtype"] = hidden.scalar_type();
    ctx->saved_data["weight_dtype"] = weight.scalar_type();
    return loss_sum / divisor;
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
            torch::Tensor(),
            torch::Tensor()};
  }
};

// log p(target) per row; backward recomputes the chunks' logits (see the header).
struct LinearTargetLogprobsFunction : public torch::autograd::Function<LinearTargetLogprobsFunction> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor hidden, torch::Tensor weight, torch::Tensor targets,
                               int64_t chunk_rows) {
    const auto device_type = hidden.device().type();
    const c10::ScalarType compute = at::autocast::is_autocast_enabled(device_type)
                                        ? at::autocast::get_autocast_dtype(device_type)
                                        : weight.scalar_type();
    c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
    const int64_t N = hidden.size(0);
    const torch::Tensor w = weight.to(compute);                                        // (V, C)
    torch::Tensor logprobs = torch::empty({N}, hidden.options().dtype(torch::kFloat));  // (N)
    torch::Tensor lse = torch::empty({N}, hidden.options().dtype(torch::kFloat));       // (N) log-sum-exp
    for (int64_t start = 0; start < N; start += chunk_rows) {
      const int64_t n = std::min(chunk_rows, N - start);
      torch::Tensor z = torch::matmul(hidden.narrow(0, start, n).to(compute), w.t()).to(torch::kFloat);  // (n, V)
      const torch::Tensor target_logit = z.gather(1, targets.narrow(0, start, n).unsqueeze(1)).squeeze(1);  // (n)
      const torch::Tensor row_max = z.amax(1, /*keepdim=*/true);                                          // (n, 1)
      const torch::Tensor row_lse = z.sub_(row_max).exp_().sum(1).log_().add_(row_max.squeeze(1));         // (n)
      lse.narrow(0, start, n).copy_(row_lse);
      logprobs.narrow(0, start, n).copy_(target_logit - row_lse);
    }
    ctx->save_for_backward({hidden, weight, targets, lse});
    ctx->saved_data["chunk_rows"] = chunk_rows;
    ctx->saved_data["compute"] = compute;
    return logprobs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &hidden = saved[0], &weight = saved[1], &targets = saved[2], &lse = saved[3];
    const torch::Tensor go = grad_outputs[0].to(torch::kFloat);  // (N) d loss / d logprob per row
    const int64_t chunk_rows = ctx->saved_data["chunk_rows"].toInt();
    const c10::ScalarType compute = ctx->saved_data["compute"].toScalarType();
    const bool want_hidden = ctx->needs_input_grad(0), want_weight = ctx->needs_input_grad(1);
    const int64_t N = hidden.size(0), C = hidden.size(1), V = weight.size(0);
    const auto f32 = hidden.options().dtype(torch::kFloat);
    const torch::Tensor w = weight.to(compute);
    // On the CPU under 16-bit autocast the gradients' matmuls take the float32 d logits and
    // weight as they are (as linear_cross_entropy's forward does): no 16-bit (V, C) product.
    const bool float32_gradients =
        !hidden.is_cuda() && compute != torch::kFloat && weight.scalar_type() == torch::kFloat;
    torch::Tensor grad_hidden, grad_weight;
    if (want_hidden) grad_hidden = torch::empty({N, C}, f32);
    if (want_weight) grad_weight = torch::zeros({V, C}, weight.options().dtype(torch::kFloat));
    for (int64_t start = 0; start < N; start += chunk_rows) {
      const int64_t n = std::min(chunk_rows, N - start);
      const torch::Tensor h = hidden.narrow(0, start, n).to(compute);                         // (n, C)
      torch::Tensor z = torch::matmul(h, w.t()).to(torch::kFloat);                            // (n, V)
      // d logprob / d z = onehot - softmax, times the row's incoming gradient.
      z.sub_(lse.narrow(0, start, n).unsqueeze(1)).exp_().neg_();                             // -softmax
      z.scatter_add_(1, targets.narrow(0, start, n).unsqueeze(1), torch::ones({n, 1}, f32));
      z.mul_(go.narrow(0, start, n).unsqueeze(1));
      const bool in_float32 = compute == torch::kFloat || float32_gradients;
      const torch::Tensor g = in_float32 ? z : z.to(compute);
      if (want_hidden) {
        torch::Tensor gh = grad_hidden.narrow(0, start, n);
        addmm_into_float32(gh, g, float32_gradients ? weight : w, /*beta=*/0, 1.0);
      }
      if (want_weight) {
        addmm_into_float32(grad_weight, g.t(), float32_gradients ? hidden.narrow(0, start, n).to(torch::kFloat) : h,
                           /*beta=*/1, 1.0);
      }
    }
    return {want_hidden ? grad_hidden.to(hidden.scalar_type()) : torch::Tensor(),
            want_weight ? grad_weight.to(weight.scalar_type()) : torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor linear_target_logprobs(const torch::Tensor& hidden, const torch::Tensor& weight,
                                     const torch::Tensor& targets, int64_t chunk_rows) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "linear_target_logprobs: hidden (N, C) and weight (V, C) expected, got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "linear_target_logprobs: targets (N) expected");
  if (chunk_rows <= 0) chunk_rows = linear_cross_entropy_chunk_rows(weight.size(0), hidden.is_cuda());
  return LinearTargetLogprobsFunction::apply(hidden, weight, targets, chunk_rows);
}

int64_t linear_cross_entropy_chunk_rows(int64_t vocab_size, bool cuda) {
  const int64_t chunk_bytes = (cuda ? 128ll : 64ll) << 20;  // of float32 logits
  return std::max<int64_t>(1, chunk_bytes / (4 * vocab_size));
}

torch::Tensor linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                   const torch::Tensor& targets, int64_t chunk_rows, double divisor) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "linear_cross_entropy: hidden (N, C) and weight (V, C) expected, got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "linear_cross_entropy: targets (N) expected");
  if (chunk_rows <= 0) chunk_rows = linear_cross_entropy_chunk_rows(weight.size(0), hidden.is_cuda());
  if (divisor <= 0) divisor = static_cast<double>(hidden.size(0));  // the mean (NaN without rows, as PyTorch's)
  const bool grad = torch::GradMode::is_enabled();
  return LinearCrossEntropyFunction::apply(hidden, weight, targets, chunk_rows, divisor, grad && hidden.requires_grad(),
                                           grad && weight.requires_grad());
}

}  // namespace gpt2ft
