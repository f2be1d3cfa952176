// Optimizer step time: 8-bit AdamW against AdamW (unfused and fused) on the same parameters and
// gradients, steps interleaved, medians, each given a found_inf of 0 as the trainer gives it.
// Prints one JSON line.
//   bench_optimizer DEVICE N_EMBD N_LAYER VOCAB STEPS
// The parameters are GPT-2's shapes for those sizes (wte, and per block c_attn, c_proj, c_fc,
// the MLP's c_proj, two LayerNorms and the biases).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "gpt2ft/core/device.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/optim/adamw.h"
#include "gpt2ft/optim/adamw_8bit.h"

namespace {

using Named = std::vector<std::pair<std::string, torch::Tensor>>;

Named gpt2_shaped(int64_t C, int64_t L, int64_t V, c10::Device device) {
  Named out;
  const auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    // Made on the device: randn of gpt2-xl's 1.5B values on the host takes seconds.
    out.emplace_back(name, (torch::randn(shape, torch::TensorOptions().device(device)) * 0.02).requires_grad_(true));
  };
  add("wte", {V, C});
  for (int64_t l = 0; l < L; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    add(h + "c_attn.weight", {3 * C, C});
    add(h + "c_attn.bias", {3 * C});
    add(h + "attn.c_proj.weight", {C, C});
    add(h + "attn.c_proj.bias", {C});
    add(h + "c_fc.weight", {4 * C, C});
    add(h + "c_fc.bias", {4 * C});
    add(h + "mlp.c_proj.weight", {C, 4 * C});
    add(h + "mlp.c_proj.bias", {C});
    add(h + "ln_1.weight", {C});
    add(h + "ln_2.weight", {C});
  }
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: bench_optimizer DEVICE N_EMBD N_LAYER VOCAB STEPS\n");
    return 2;
  }
  try {
    const c10::Device device = gpt2ft::open_device(argv[1]);
    const int64_t C = std::stoll(argv[2]), L = std::stoll(argv[3]), V = std::stoll(argv[4]);
    const int steps = std::stoi(argv[5]);
    torch::manual_seed(0);
    const Named params = gpt2_shaped(C, L, V, device);
    int64_t numel = 0;
    for (const auto& [name, p] : params) {
      p.mutable_grad() = torch::randn_like(p) * 1e-3;
      numel += p.numel();
    }
    gpt2ft::AdamWOptions unfused, fused;
    fused.fused = true;
    std::vector<std::pair<std::string, std::unique_ptr<gpt2ft::Optimizer>>> optimizers;
    optimizers.emplace_back("adamw_unfused", std::make_unique<gpt2ft::AdamW>(params, unfused));
    optimizers.emplace_back("adamw_fused", std::make_unique<gpt2ft::AdamW>(params, fused));
    optimizers.emplace_back("adamw_8bit", std::make_unique<gpt2ft::AdamW8bit>(params, unfused));
    const auto sync = [&] {
      if (device.is_cuda()) params.front().second.sum().item<float>();
    };
    // found_inf as the trainer passes it on every step (fp32 and bf16 too: a non-finite norm
    // skips), so each optimizer is timed on the path training takes.
    gpt2ft::GradientScaling scaling;
    scaling.found_inf = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat).device(device));
    std::vector<std::vector<double>> times(optimizers.size());
    for (int s = -1; s < steps; ++s) {  // step -1 warms up
      for (size_t k = 0; k < optimizers.size(); ++k) {
        sync();
        const auto start = std::chrono::steady_clock::now();
        optimizers[k].second->step(1e-4, scaling);
        sync();
        const double ms = 1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (s >= 0) times[k].push_back(ms);
      }
    }
    nlohmann::json out = {{"device", device.str()}, {"parameters", numel}, {"steps", steps}};
    for (size_t k = 0; k < optimizers.size(); ++k) out[optimizers[k].first + "_ms"] = median(times[k]);
    out["ratio_8bit_to_unfused"] = median(times[2]) / median(times[0]);
    out["ratio_8bit_to_fused"] = median(times[2]) / median(times[1]);
    std::cout << out.dump() << std::endl;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_optimizer: %s\n", gpt2ft::describe_exception(e).c_str());
    return 1;
  }
  return 0;
}
