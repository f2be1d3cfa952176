// AdamW with 8-bit moments (train.optimizer "adamw_8bit"), following torchao 0.18's AdamW8bit.
// A trained tensor of at least 4096 values, a multiple of 256, keeps each moment as 8-bit codes
// with one float32 scale per block of 256 (optim/blockwise_quantization.h): exp_avg on the
// signed dynamic map, exp_avg_sq on the unsigned one, 2 bytes a value plus 8 bytes a block
// instead of 8 bytes a value. Smaller tensors (biases, LayerNorm, most LoRA adapters) keep
// float32 moments, as torchao and bitsandbytes do.
//
// The update of one tensor, in float32, torchao's order of operations (lr a float32 scalar):
//   p  = p - lr * wd * p                                  (decay: tensors of dim >= 2, as AdamW)
//   m  = dequant(m_codes).lerp(g, 1 - beta1);  v = dequant(v_codes).lerp(g^2, 1 - beta2)
//   m_codes, v_codes = quant(m), quant(v)                 (stored)
//   p  = p - lr * (m / (1 - beta1^t)) / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// with the float32 m and v of this step, before they were quantized. A step with found_inf != 0
// changes nothing: on the host the flag is read once; on a GPU the skip is folded into the
// update (torch.where), so no step waits for the host.
//
// Three kernels. kOps: those ATen ops, every tensor a piece of at most 2^22 values at a time
// (whole blocks, so the result is the same; it bounds the float32 temporaries); bitwise
// torchao's eager step. Codes come from one searchsorted per value. kFused (the default on the
// CPU): one pass per block of 256 over the same formulas in float32, blocks in parallel,
// compiled for AVX-512 / AVX2 / baseline x86 at run time; it rounds a few operations
// differently (an ulp), so a code at a rounding tie may differ. The CUDA kernel (the default
// on CUDA, optim/adamw_8bit_cuda.h): one launch per tensor, a CUDA block per block of 256, the
// same formulas, the skip on the device, no temporary tensor; the bias corrections are the
// correctly rounded float32 powers, which ATen's float32 pow may miss by an ulp.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/optim/adamw.h"
#include "gpt2ft/optim/optimizer.h"

namespace gpt2ft {

// torchao's rule: quantize the moments of a tensor of `numel` values; an embedding (wte, wpe,
// an untied lm_head) only with quantize_embeddings (AdamWOptions).
bool adamw_8bit_quantizes(const std::string& name, int64_t numel, bool quantize_embeddings);
bool is_embedding_parameter(const std::string& name);

// Bytes of AdamW8bit's state for the tensor `name` of `numel` values (moments, scales, step).
int64_t adamw_8bit_state_bytes(const std::string& name, int64_t numel, bool quantize_embeddings);

// AdamW8bit's checkpoint entries for one parameter, empty (Optimizer::state_layout).
NamedTensors adamw_8bit_state_layout(const std::string& name, const torch::Tensor& param, bool quantize_embeddings);

// The moments and step count of the parameter `name` as a checkpoint holds them, in float32 on
// the CPU, whichever optimizer wrote them: AdamW's ("adamw.*", as they are) or 8-bit AdamW's
// ("adamw8bit.*", dequantized when in blocks). nullopt when neither holds it. For a resume that
// changes train.optimizer or train.adamw_8bit.embeddings (an out-of-memory exit's advice).
struct SavedMoments {
  torch::Tensor exp_avg, exp_avg_sq;  // (n) float32
  torch::Tensor step;                 // () float32
  bool in_blocks = false;             // they were 8-bit blocks
};
std::optional<SavedMoments> saved_moments(const SafetensorsReader& state, const std::string& name);

// The scalars of one tensor's fused step (float32, as the op path computes them).
struct StepScalars {
  float lr, decay, one_minus_beta1, one_minus_beta2, bias_correction1, sqrt_bias_correction2, eps;
};

class AdamW8bit final : public Optimizer {
 public:
  struct State {
    std::string name;
    torch::Tensor param;
    double weight_decay = 0;
    bool quantized = false;
    torch::Tensor exp_avg, exp_avg_sq;                // uint8 codes (quantized) or float32, param's shape
    torch::Tensor exp_avg_scales, exp_avg_sq_scales;  // (numel / 256) float32, quantized only
    torch::Tensor step;                               // () float32
  };

  // kAuto: kFused on the CPU, the CUDA kernel on CUDA (optim/adamw_8bit_cuda.h; kOps when it
  // was not built); kOps: the ATen ops everywhere (torchao's eager step, for comparisons).
  enum class Kernel { kAuto, kOps };

  AdamW8bit(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, AdamWOptions options,
            Kernel kernel = Kernel::kAuto);

  void step(double lr, const GradientScaling& scaling = {}) override;
  std::string run_report() const override;
  // "adamw8bit.exp_avg.<name>" (codes or float32), "adamw8bit.exp_avg.scales.<name>" (quantized),
  // the same for exp_avg_sq, and "adamw8bit.step.<name>".
  NamedTensors checkpoint_state() const override;
  void restore_state(const SafetensorsReader& state) override;
  NamedTensors state_layout(const std::string& name, const torch::Tensor& param) const override;

  const std::vector<State>& states() const { return states_; }

 private:
  // skip: () bool on the device, true to leave everything as it was; undefined: apply.
  void update(State& s, const torch::Tensor& lr, const torch::Tensor& skip);
  StepScalars fused_scalars(const State& s, const torch::Tensor& lr) const;
  void update_fused(State& s, const StepScalars& scalars);
  void step_cuda(double lr, const GradientScaling& scaling);
  AdamWOptions options_;
  Kernel kernel_;
  std::vector<State> states_;
  torch::Tensor signed_map_, unsigned_map_;  // (256) float32 on the parameters' device
};

}  // namespace gpt2ft
