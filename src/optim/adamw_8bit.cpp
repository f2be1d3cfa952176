// AdamW with block-wise 8-bit moments.
#include "gpt2ft/optim/adamw_8bit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <thread>

#include <ATen/Parallel.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/error.h"
#include "gpt2ft/optim/adamw_8bit_cuda.h"
#include "gpt2ft/optim/blockwise_quantization.h"

namespace gpt2ft {
namespace {

constexpr int64_t kMinQuantized = 4096;
constexpr int64_t kChunk = int64_t{1} << 22;  // values per piece of a large tensor's update (whole blocks)

std::string key(const char* what, const std::string& name) { return std::string("adamw8bit.") + what + name; }

}  // namespace

bool is_embedding_parameter(const std::string& name) {
  const auto ends = [&](const std::string& tail) {
    return name.size() >= tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
  };
  return ends("wte.weight") || ends("wpe.weight") || ends("lm_head.weight");
}

bool adamw_8bit_quantizes(const std::string& name, int64_t numel, bool quantize_embeddings) {
  if (!quantize_embeddings && is_embedding_parameter(name)) return false;
  return numel >= kMinQuantized && numel % kQuantizationBlock == 0;
}

int64_t adamw_8bit_state_bytes(const std::string& name, int64_t numel, bool quantize_embeddings) {
  if (!adamw_8bit_quantizes(name, numel, quantize_embeddings)) return 8 * numel + 4;
  return 2 * numel + 2 * 4 * (numel / kQuantizationBlock) + 4;
}

AdamW8bit::AdamW8bit(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, AdamWOptions options,
                     Kernel kernel)
    : options_(options), kernel_(kernel) {
  for (const auto& [name, p] : named_params) {
    if (!p.requires_grad()) continue;
    if (p.scalar_type() != torch::kFloat) {
      throw Error("train.optimizer \"adamw_8bit\": " + name + " is " + std::string(c10::toString(p.scalar_type())) +
                  "; it updates float32 parameters only");
    }
    if (!signed_map_.defined()) {
      signed_map_ = dynamic_quantization_map(true).to(p.device());
      unsigned_map_ = dynamic_quantization_map(false).to(p.device());
    }
    State s;
    s.name = name;
    s.param = p;
    s.weight_decay = p.dim() >= 2 ? options.weight_decay : 0.0;  // as AdamW: no decay for biases and LayerNorm
    s.quantized = adamw_8bit_quantizes(name, p.numel(), options.quantize_embeddings);
    const auto f32 = p.options().dtype(torch::kFloat);
    if (s.quantized) {
      s.exp_avg = torch::zeros(p.sizes(), p.options().dtype(torch::kByte));
      s.exp_avg_sq = torch::zeros(p.sizes(), p.options().dtype(torch::kByte));
      s.exp_avg_scales = torch::zeros({p.numel() / kQuantizationBlock}, f32);
      s.exp_avg_sq_scales = torch::zeros({p.numel() / kQuantizationBlock}, f32);
    } else {
      s.exp_avg = torch::zeros(p.sizes(), f32);
      s.exp_avg_sq = torch::zeros(p.sizes(), f32);
    }
    s.step = torch::zeros({}, f32);
    states_.push_back(std::move(s));
  }
}

namespace {

// dst = value, or with `skip` (() bool) defined dst = skip ? dst : value (a step skipped on the
// device, without reading the flag on the host).
void commit(torch::Tensor& dst, const torch::Tensor& value, const torch::Tensor& skip) {
  dst.copy_(skip.defined() ? torch::where(skip, dst, value) : value);
}

}  // namespace

void AdamW8bit::update(State& s, const torch::Tensor& lr, const torch::Tensor& skip) {
  const double beta1 = options_.betas[0], beta2 = options_.betas[1];
  if (skip.defined()) {
    s.step.add_(skip.logical_not());  // 1 when the step is taken
  } else {
    s.step.add_(1);
  }
  const torch::Tensor bias_correction1 = 1 - torch::pow(beta1, s.step);  // () float32
  const torch::Tensor bias_correction2 = 1 - torch::pow(beta2, s.step);
  const torch::Tensor decay = lr * s.weight_decay;                         // () float32
  const int64_t n = s.param.numel();
  torch::Tensor p = s.param.view({-1}), g = s.param.grad().view({-1});     // (n)
  torch::Tensor m_state = s.exp_avg.view({-1}), v_state = s.exp_avg_sq.view({-1});
  // Every tensor in pieces of at most kChunk values (whole blocks): the update is elementwise
  // within a block, so the result is the same, and the float32 temporaries stay bounded.
  for (int64_t at = 0; at < n; at += kChunk) {
    const int64_t len = std::min(kChunk, n - at);
    torch::Tensor pp = p.narrow(0, at, len);
    const torch::Tensor gg = g.narrow(0, at, len);  // (len)
    torch::Tensor m_codes = m_state.narrow(0, at, len), v_codes = v_state.narrow(0, at, len);
    torch::Tensor m, v;  // float32 moments of this step
    if (s.quantized) {
      const int64_t b0 = at / kQuantizationBlock, blocks = len / kQuantizationBlock;
      torch::Tensor m_scales = s.exp_avg_scales.narrow(0, b0, blocks), v_scales = s.exp_avg_sq_scales.narrow(0, b0, blocks);
      m = dequantize_blockwise(m_codes, m_scales, signed_map_).lerp(gg, 1 - beta1);
      v = dequantize_blockwise(v_codes, v_scales, unsigned_map_).lerp(gg.square(), 1 - beta2);
      if (skip.defined()) {  // quantized aside, then kept or dropped
        torch::Tensor mc = torch::empty_like(m_codes), vc = torch::empty_like(v_codes);
        torch::Tensor ms = torch::empty_like(m_scales), vs = torch::empty_like(v_scales);
        quantize_blockwise(m, signed_map_, kQuantizationBlock, mc, ms);
        quantize_blockwise(v, unsigned_map_, kQuantizationBlock, vc, vs);
        commit(m_codes, mc, skip);
        commit(m_scales, ms, skip);
        commit(v_codes, vc, skip);
        commit(v_scales, vs, skip);
      } else {
        quantize_blockwise(m, signed_map_, kQuantizationBlock, m_codes, m_scales);
        quantize_blockwise(v, unsigned_map_, kQuantizationBlock, v_codes, v_scales);
      }
    } else {
      m = m_codes.lerp(gg, 1 - beta1);
      v = v_codes.lerp(gg.square(), 1 - beta2);
      commit(m_codes, m, skip);
      commit(v_codes, v, skip);
    }
    torch::Tensor updated = pp - decay * pp;
    const torch::Tensor denom = v.sqrt() / bias_correction2.sqrt() + options_.eps;
    updated = updated - lr * (m / bias_correction1) / denom;
    commit(pp, updated, skip);
  }
}

namespace {

// A dynamic map with a table that starts the search for the largest entry <= y near its end:
// y's float32 bits without the low 17 mantissa bits (the sign, the exponent and 6 mantissa
// bits) name a bucket; for each bucket the table holds the largest code whose entry is <=
// every y in it, and at most two entries lie inside a bucket of [-1, 1]. Branch-free, so the
// loop over a block vectorizes (gathers).
class MapSearch {
 public:
  static constexpr int kShift = 17;
  static constexpr int kMaxInBucket = 2;

  explicit MapSearch(const float* map) : map_(map, map + 256), start_(size_t{1} << (32 - kShift)) {
    map_.push_back(std::numeric_limits<float>::infinity());  // the search never steps past 255
    const uint32_t half = 1u << (31 - kShift);               // buckets per sign
    int most = 0;
    for (uint32_t t = 0; t < half; ++t) {
      const float low = from_bits(t << kShift);
      const float high = t + 1 < half ? from_bits((t + 1) << kShift) : std::numeric_limits<float>::infinity();
      start_[t] = floor_code(low);            // y in [low, high)
      start_[half + t] = floor_code(-high);   // y in (-high, -low]
      if (low <= 1.0f) {  // scaled moments lie in [-1, 1]
        most = std::max({most, floor_code(std::nextafter(high, 0.0f)) - start_[t], floor_code(-low) - start_[half + t]});
      }
    }
    TORCH_CHECK(most <= kMaxInBucket, "a quantization map bucket holds ", most, " entries");
  }
  const float* map() const { return map_.data(); }
  const int32_t* start() const { return start_.data(); }

 private:
  static float from_bits(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  int floor_code(float y) const {
    int code = 0;
    while (code < 255 && map_[code + 1] <= y) ++code;
    return code;
  }
  std::vector<float> map_;     // 256 entries and +inf
  std::vector<int32_t> start_;
};

// quantize_blockwise's codes for x[0..n) / scale: the largest entry <= y (0 when none), then
// the nearer of it and the next one (ties up).
__attribute__((target_clones("avx512f", "avx2", "default")))
void quantize_values(const float* __restrict x, float scale, const float* __restrict map,
                     const int32_t* __restrict start, uint8_t* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float y = x[i] / scale;
    int32_t code = start[__builtin_bit_cast(uint32_t, y) >> MapSearch::kShift];
    code += map[code + 1] <= y ? 1 : 0;
    code += map[code + 1] <= y ? 1 : 0;
    const int32_t up = code + (code < 255 ? 1 : 0);
    const float low = map[code], high = map[up];
    out[i] = static_cast<uint8_t>((y - low) >= (high - low) * 0.5f ? up : code);
  }
}

struct Maps {
  const MapSearch* signed_map;
  const MapSearch* unsigned_map;
};

inline float lerp(float self, float end, float weight) {  // ATen's formula
  const float diff = end - self;
  return weight < 0.5f ? self + weight * diff : end - diff * (1.0f - weight);
}

// One block of n values: the moments dequantized (or read, float32), updated, the weights
// updated from them (a loop the compiler vectorizes), then the moments stored: quantized with
// their new scale, or as they are.
template <bool kQuantized>
__attribute__((target_clones("avx512f", "avx2", "default")))
void fused_block(float* __restrict p, const float* __restrict g, uint8_t* __restrict m_codes,
                 uint8_t* __restrict v_codes, float* m_scale, float* v_scale, float* __restrict m_plain,
                 float* __restrict v_plain, int64_t n, const StepScalars& k, Maps maps) {
  alignas(64) float m[kQuantizationBlock];
  alignas(64) float v[kQuantizationBlock];
  const float* __restrict signed_map = maps.signed_map->map();
  const float* __restrict unsigned_map = maps.unsigned_map->map();
  const float sm = kQuantized ? *m_scale : 0.0f, sv = kQuantized ? *v_scale : 0.0f;
  const float b1 = k.one_minus_beta1, b2 = k.one_minus_beta2, decay = k.decay, lr = k.lr;
  const float bc1 = k.bias_correction1, sbc2 = k.sqrt_bias_correction2, eps = k.eps;
  for (int64_t i = 0; i < n; ++i) {
    const float m_old = kQuantized ? signed_map[m_codes[i]] * sm : m_plain[i];
    const float v_old = kQuantized ? unsigned_map[v_codes[i]] * sv : v_plain[i];
    const float gi = g[i];
    const float mi = lerp(m_old, gi, b1), vi = lerp(v_old, gi * gi, b2);
    m[i] = mi;
    v[i] = vi;
    const float pi = p[i] - decay * p[i];
    p[i] = pi - lr * (mi / bc1) / (std::sqrt(vi) / sbc2 + eps);
  }
  if (!kQuantized) {
    std::memcpy(m_plain, m, static_cast<size_t>(n) * sizeof(float));
    std::memcpy(v_plain, v, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  float m_max = 0.0f, v_max = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    m_max = std::max(m_max, std::abs(m[i]));
    v_max = std::max(v_max, std::abs(v[i]));
  }
  const float m_s = std::max(m_max, 1e-12f), v_s = std::max(v_max, 1e-12f);
  quantize_values(m, m_s, maps.signed_map->map(), maps.signed_map->start(), m_codes, n);
  quantize_values(v, v_s, maps.unsigned_map->map(), maps.unsigned_map->start(), v_codes, n);
  *m_scale = m_s;
  *v_scale = v_s;
}

}  // namespace

namespace {

// The maps' search tables of the fused kernel, built on first use (by fused_scalars, before any
// tensor changes).
Maps cpu_maps() {
  static const torch::Tensor signed_cpu = dynamic_quantization_map(true), unsigned_cpu = dynamic_quantization_map(false);
  static const MapSearch signed_search(signed_cpu.data_ptr<float>()), unsigned_search(unsigned_cpu.data_ptr<float>());
  return Maps{&signed_search, &unsigned_search};
}

}  // namespace

StepScalars AdamW8bit::fused_scalars(const State& s, const torch::Tensor& lr) const {
  cpu_maps();
  const double beta1 = options_.betas[0], beta2 = options_.betas[1];
  // The scalars as the op path computes them (float32 tensors, from the step count after this
  // step), read once; nothing changes yet.
  const torch::Tensor next = s.step + 1;
  StepScalars k;
  k.lr = lr.item<float>();
  k.decay = (lr * s.weight_decay).item<float>();
  k.bias_correction1 = (1 - torch::pow(beta1, next)).item<float>();
  k.sqrt_bias_correction2 = (1 - torch::pow(beta2, next)).sqrt().item<float>();
  k.one_minus_beta1 = static_cast<float>(1 - beta1);
  k.one_minus_beta2 = static_cast<float>(1 - beta2);
  k.eps = static_cast<float>(options_.eps);
  return k;
}

// No tensor is allocated here: the scalars were computed before any tensor changed.
void AdamW8bit::update_fused(State& s, const StepScalars& k) {
  s.step.add_(1);
  const Maps maps = cpu_maps();
  float* p = s.param.data_ptr<float>();
  const float* g = s.param.grad().data_ptr<float>();
  const int64_t n = s.param.numel(), B = kQuantizationBlock;
  const int64_t blocks = (n + B - 1) / B;
  const auto run = [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t at = b * B, len = std::min(B, n - at);
      if (s.quantized) {
        fused_block<true>(p + at, g + at, s.exp_avg.data_ptr<uint8_t>() + at, s.exp_avg_sq.data_ptr<uint8_t>() + at,
                          s.exp_avg_scales.data_ptr<float>() + b, s.exp_avg_sq_scales.data_ptr<float>() + b, nullptr,
                          nullptr, len, k, maps);
      } else {
        fused_block<false>(p + at, g + at, nullptr, nullptr, nullptr, nullptr, s.exp_avg.data_ptr<float>() + at,
                           s.exp_avg_sq.data_ptr<float>() + at, len, k, maps);
      }
    }
  };
  // Blocks split over libtorch's intra-op thread count (our code is not built with OpenMP, so
  // at::parallel_for would run serially here); small tensors stay on this thread.
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks / 1024);
  if (threads <= 1) {
    run(0, blocks);
    return;
  }
  std::vector<std::thread> workers;
  const int64_t per = (blocks + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) workers.emplace_back(run, t * per, std::min(blocks, (t + 1) * per));
  run(0, std::min(blocks, per));
  for (auto& w : workers) w.join();
}

void AdamW8bit::step(double lr, const GradientScaling& scaling) {
  torch::NoGradGuard no_grad;
  // A skipped step changes nothing. On the host the flag is read; on a GPU the skip is folded
  // into the update, so the optimizer's kernels never wait for the host.
  torch::Tensor skip;
  if (scaling.found_inf) {
    if (scaling.found_inf->is_cpu()) {
      if (scaling.found_inf->item<float>() != 0.0f) return;
    } else {
      skip = scaling.found_inf->ne(0);  // () bool, once for every tensor's update
    }
  }
  if (states_.empty()) return;
  if (kernel_ == Kernel::kAuto && states_.front().param.is_cuda() && adamw_8bit_cuda_kernel_available()) {
    step_cuda(lr, scaling);
    return;
  }
  const torch::Tensor lr32 = torch::scalar_tensor(lr, states_.front().param.options().dtype(torch::kFloat));
  // The fused CPU kernel's scalars for every tensor first: running out of memory there leaves
  // every tensor as it was (the kernel itself allocates no tensor).
  std::vector<std::optional<StepScalars>> fused(states_.size());
  for (size_t i = 0; i < states_.size(); ++i) {
    const State& s = states_[i];
    if (s.param.grad().defined() && kernel_ == Kernel::kAuto && s.param.is_cpu() && s.param.grad().is_contiguous() &&
        s.param.is_contiguous()) {
      fused[i] = fused_scalars(s, lr32);
    }
  }
  for (size_t i = 0; i < states_.size(); ++i) {
    State& s = states_[i];
    if (!s.param.grad().defined()) continue;  // no gradient: no decay, no moments, no count (as AdamW)
    if (fused[i]) {
      update_fused(s, *fused[i]);
    } else {
      update(s, lr32, skip);
    }
  }
}

// One kernel per tensor, and two launches for all the step counts: advanced, then (as fused
// AdamW) taken back by found_inf, all on the device.
void AdamW8bit::step_cuda(double lr, const GradientScaling& scaling) {
  std::vector<torch::Tensor> steps;
  for (const State& s : states_) {
    if (!s.param.grad().defined()) continue;  // no gradient: no decay, no moments, no count (as AdamW)
    if (!s.param.is_contiguous() || !s.param.grad().is_contiguous() || s.param.grad().scalar_type() != torch::kFloat) {
      throw Error("train.optimizer \"adamw_8bit\": " + s.name + " or its gradient is not contiguous float32 on CUDA");
    }
    steps.push_back(s.step);
  }
  if (steps.empty()) return;
  torch::_foreach_add_(steps, 1);
  if (scaling.found_inf) torch::_foreach_add_(steps, *scaling.found_inf, -1);
  const float* found_inf = scaling.found_inf ? scaling.found_inf->data_ptr<float>() : nullptr;
  AdamW8bitCudaScalars k;
  k.lr = static_cast<float>(lr);
  k.beta1 = options_.betas[0];
  k.beta2 = options_.betas[1];
  k.one_minus_beta1 = static_cast<float>(1 - options_.betas[0]);
  k.one_minus_beta2 = static_cast<float>(1 - options_.betas[1]);
  k.eps = static_cast<float>(options_.eps);
  const c10::Device device = states_.front().param.device();
  void* stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle();
  for (State& s : states_) {
    if (!s.param.grad().defined()) continue;
    AdamW8bitCudaTensor t;
    t.param = s.param.data_ptr<float>();
    t.grad = s.param.grad().data_ptr<float>();
    t.exp_avg = s.exp_avg.data_ptr();
    t.exp_avg_sq = s.exp_avg_sq.data_ptr();
    t.exp_avg_scales = s.quantized ? s.exp_avg_scales.data_ptr<float>() : nullptr;
    t.exp_avg_sq_scales = s.quantized ? s.exp_avg_sq_scales.data_ptr<float>() : nullptr;
    t.step = s.step.data_ptr<float>();
    t.numel = s.param.numel();
    t.quantized = s.quantized;
    t.weight_decay = static_cast<float>(s.weight_decay);
    adamw_8bit_cuda_step(t, k, found_inf, signed_map_.data_ptr<float>(), unsigned_map_.data_ptr<float>(), stream);
  }
}

std::string AdamW8bit::run_report() const {
  int64_t bytes = 0, quantized = 0, kept = 0;
  for (const auto& s : states_) {
    bytes += adamw_8bit_state_bytes(s.name, s.param.numel(), options_.quantize_embeddings);
    (s.quantized ? quantized : kept) += s.param.numel();
  }
  return fmt::format("AdamW 8-bit state: {:.1f} MiB; {} values in 8-bit blocks, {} in float32 (tensors under 4096 "
                     "values or not a multiple of 256)",
                     bytes / double(1 << 20), quantized, kept);
}

NamedTensors AdamW8bit::checkpoint_state() const {
  NamedTensors out;
  for (const auto& s : states_) {
    out.emplace_back(key("exp_avg.", s.name), s.exp_avg);
    if (s.quantized) out.emplace_back(key("exp_avg.scales.", s.name), s.exp_avg_scales);
    out.emplace_back(key("exp_avg_sq.", s.name), s.exp_avg_sq);
    if (s.quantized) out.emplace_back(key("exp_avg_sq.scales.", s.name), s.exp_avg_sq_scales);
    out.emplace_back(key("step.", s.name), s.step);
  }
  return out;
}

NamedTensors AdamW8bit::state_layout(const std::string& name, const torch::Tensor& p) const {
  return adamw_8bit_state_layout(name, p, options_.quantize_embeddings);
}

NamedTensors adamw_8bit_state_layout(const std::string& name, const torch::Tensor& p, bool quantize_embeddings) {
  NamedTensors out;
  const auto f32 = p.options().dtype(torch::kFloat);
  const bool quantized = adamw_8bit_quantizes(name, p.numel(), quantize_embeddings);
  const auto moment = quantized ? p.options().dtype(torch::kByte) : f32;
  out.emplace_back(key("exp_avg.", name), torch::empty(p.sizes(), moment));
  if (quantized) out.emplace_back(key("exp_avg.scales.", name), torch::empty({p.numel() / kQuantizationBlock}, f32));
  out.emplace_back(key("exp_avg_sq.", name), torch::empty(p.sizes(), moment));
  if (quantized) out.emplace_back(key("exp_avg_sq.scales.", name), torch::empty({p.numel() / kQuantizationBlock}, f32));
  out.emplace_back(key("step.", name), torch::empty({}, f32));
  return out;
}

std::optional<SavedMoments> saved_moments(const SafetensorsReader& state, const std::string& name) {
  SavedMoments out;
  if (state.contains("adamw.step." + name)) {
    out.exp_avg = state.load("adamw.exp_avg." + name, torch::kFloat).reshape({-1});
    out.exp_avg_sq = state.load("adamw.exp_avg_sq." + name, torch::kFloat).reshape({-1});
    out.step = state.load("adamw.step." + name, torch::kFloat).reshape({});
    return out;
  }
  if (!state.contains(key("step.", name))) return std::nullopt;
  out.step = state.load(key("step.", name), torch::kFloat).reshape({});
  out.in_blocks = state.contains(key("exp_avg.scales.", name));
  if (!out.in_blocks) {
    out.exp_avg = state.load(key("exp_avg.", name), torch::kFloat).reshape({-1});
    out.exp_avg_sq = state.load(key("exp_avg_sq.", name), torch::kFloat).reshape({-1});
    return out;
  }
  const torch::Tensor m_codes = state.load(key("exp_avg.", name)), v_codes = state.load(key("exp_avg_sq.", name));
  const torch::Tensor m_scales = state.load(key("exp_avg.scales.", name), torch::kFloat);
  const torch::Tensor v_scales = state.load(key("exp_avg_sq.scales.", name), torch::kFloat);
  if (m_codes.scalar_type() != torch::kByte || v_codes.scalar_type() != torch::kByte ||
      m_codes.numel() != m_scales.numel() * kQuantizationBlock || v_codes.numel() != v_scales.numel() * kQuantizationBlock) {
    throw Error(state.path().string() + ": adamw8bit state of " + name + " holds codes and scales that do not match "
                "(uint8 codes, one scale a block of 256); the checkpoint is damaged. Resume from an earlier one");
  }
  out.exp_avg = dequantize_blockwise(m_codes, m_scales, dynamic_quantization_map(true));
  out.exp_avg_sq = dequantize_blockwise(v_codes, v_scales, dynamic_quantization_map(false));
  return out;
}

void AdamW8bit::restore_state(const SafetensorsReader& state) {
  int64_t quantized_now = 0, kept_now = 0;  // tensors whose saved form was another (converted here)
  for (auto& s : states_) {
    const bool saved_8bit = state.contains(key("step.", s.name));
    const bool saved_in_blocks = state.contains(key("exp_avg.scales.", s.name));
    if (!saved_8bit || saved_in_blocks != s.quantized) {
      // AdamW's moments (train.optimizer was "adamw"), or 8-bit AdamW's in the other form
      // (train.adamw_8bit.embeddings changed): quantized with torchao's rule, or dequantized.
      if (const auto saved = saved_moments(state, s.name)) {
        if (saved->exp_avg.numel() != s.param.numel() || saved->exp_avg_sq.numel() != s.param.numel()) {
          throw Error(state.path().string() + ": the optimizer state of " + s.name + " holds " +
                      std::to_string(saved->exp_avg.numel()) + " values, the parameter " +
                      std::to_string(s.param.numel()) + "; the checkpoint is of another model");
        }
        const torch::Tensor m = saved->exp_avg.to(s.param.device()), v = saved->exp_avg_sq.to(s.param.device());
        if (s.quantized) {
          torch::Tensor m_codes = s.exp_avg.view({-1}), v_codes = s.exp_avg_sq.view({-1});
          quantize_blockwise(m, signed_map_, kQuantizationBlock, m_codes, s.exp_avg_scales);
          quantize_blockwise(v, unsigned_map_, kQuantizationBlock, v_codes, s.exp_avg_sq_scales);
          ++quantized_now;
        } else {
          s.exp_avg.view({-1}).copy_(m);
          s.exp_avg_sq.view({-1}).copy_(v);
          ++kept_now;
        }
        s.step.copy_(saved->step);
        continue;
      }
    }
    const std::string hint = "the checkpoint is damaged, or the set of trained parameters changed";
    // Exactly the dtypes written (codes uint8, scales and moments float32): a conversion would
    // turn codes of another dtype, or out of range, into other codes without a word.
    state.load_exact(key("exp_avg.", s.name), s.exp_avg, hint);
    state.load_exact(key("exp_avg_sq.", s.name), s.exp_avg_sq, hint);
    if (s.quantized) {
      state.load_exact(key("exp_avg.scales.", s.name), s.exp_avg_scales, hint);
      state.load_exact(key("exp_avg_sq.scales.", s.name), s.exp_avg_sq_scales, hint);
    }
    state.load_exact(key("step.", s.name), s.step, hint);
    // Scales are a block's largest |moment| (at least 1e-12 once stepped, 0 before the first
    // step); moments finite. (Step counts are checked with every optimizer's, in load_checkpoint.)
    const auto finite_not_negative = [](const torch::Tensor& t) { return (torch::isfinite(t) & (t >= 0)).all().item<bool>(); };
    const bool good = s.quantized ? finite_not_negative(s.exp_avg_scales) && finite_not_negative(s.exp_avg_sq_scales)
                                  : torch::isfinite(s.exp_avg).all().item<bool>() && finite_not_negative(s.exp_avg_sq);
    if (!good) {
      throw Error(state.path().string() + ": adamw8bit state of " + s.name +
                  " holds a negative or non-finite scale, or a non-finite or negative moment; the checkpoint is "
                  "damaged. Resume from an earlier one");
    }
  }
  if (quantized_now + kept_now > 0) {
    spdlog::info("8-bit AdamW resumed from another optimizer state: the moments of {} tensor(s) quantized into 8-bit "
                 "blocks (torchao's rule), {} kept in float32", quantized_now, kept_now);
  }
}

}  // namespace gpt2ft
