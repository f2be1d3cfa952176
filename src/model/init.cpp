// GPT-2 weight initialisation.
#include "gpt2ft/model/init.h"

#include <cmath>

#include <torch/torch.h>

namespace gpt2ft {

void init_gpt2_weights(GPT2& model, uint64_t seed) {
  torch::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const GPT2Config& c = model->config();
  const double stdev = c.initializer_range;
  const double residual_stdev = stdev / std::sqrt(2.0 * static_cast<double>(c.n_layer));

  auto normal = [&](torch::Tensor& t, double sd) {
    // Draw on the CPU generator so the result does not depend on the device.
    t.copy_(at::normal(0.0, sd, t.sizes(), gen, torch::TensorOptions().dtype(torch::kFloat)));
  };
  for (auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    torch::Tensor& p = item.value();
    const bool is_bias = name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    const bool is_layer_norm = name.find(".ln_") != std::string::npos;
    if (is_layer_norm) {
      is_bias ? p.zero_() : p.fill_(1.0);
    } else if (is_bias) {
      p.zero_();
    } else if (name.find("c_proj.weight") != std::string::npos) {
      normal(p, residual_stdev);
    } else {
      normal(p, stdev);
    }
  }
}

}  // namespace gpt2ft
