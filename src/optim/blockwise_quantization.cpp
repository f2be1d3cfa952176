// Block-wise 8-bit quantization with the dynamic maps.
#include "gpt2ft/optim/blockwise_quantization.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <torch/torch.h>

#include "gpt2ft/core/error.h"

namespace gpt2ft {

torch::Tensor dynamic_quantization_map(bool is_signed) {
  // Built with the same float32 tensor ops as the reference (linspace, midpoints, a scalar
  // product), so that every entry is the same float32 value.
  std::vector<float> values;
  for (int k = 0; k < 7; ++k) {
    const int64_t steps = (int64_t{1} << (is_signed ? k : k + 1)) + 1;
    const torch::Tensor bounds = torch::linspace(0.1, 1.0, steps, torch::kFloat);  // (steps)
    const torch::Tensor means = (bounds.narrow(0, 0, steps - 1) + bounds.narrow(0, 1, steps - 1)) / 2.0;
    const torch::Tensor level = k == 6 ? means * 1 : means * std::pow(10.0, k - 6);
    const float* p = level.data_ptr<float>();
    for (int64_t i = 0; i < steps - 1; ++i) values.push_back(p[i]);
    if (is_signed) {
      const torch::Tensor negative = k == 6 ? means * -1 : means * -std::pow(10.0, k - 6);
      const float* q = negative.data_ptr<float>();
      for (int64_t i = 0; i < steps - 1; ++i) values.push_back(q[i]);
    }
  }
  values.push_back(0.0f);
  values.push_back(1.0f);
  TORCH_CHECK(values.size() == 256, "dynamic map of ", values.size(), " values");
  std::sort(values.begin(), values.end());
  return torch::tensor(values, torch::kFloat);
}

torch::Tensor nearest_codes(const torch::Tensor& y, const torch::Tensor& map) {
  // The largest entry <= y (0 when none): one past it is the first entry > y.
  const torch::Tensor down = (torch::searchsorted(map, y.contiguous(), /*out_int32=*/true, /*right=*/true) - 1)
                                 .clamp_(0, 255);                         // y's shape, int32
  const torch::Tensor up = (down + 1).clamp_max_(255);
  const torch::Tensor down_value = map.index_select(0, down.reshape({-1})).view(y.sizes());
  const torch::Tensor up_value = map.index_select(0, up.reshape({-1})).view(y.sizes());
  return torch::where((y - down_value) >= (up_value - down_value) * 0.5, up, down);  // ties up
}

void quantize_blockwise(const torch::Tensor& x, const torch::Tensor& map, int64_t block, torch::Tensor& codes,
                        torch::Tensor& scales) {
  const int64_t n = x.numel();
  TORCH_CHECK(n % block == 0, "quantize_blockwise: ", n, " values are not a multiple of the block ", block);
  const torch::Tensor blocks = x.reshape({n / block, block});                  // (blocks, block)
  const torch::Tensor scale = blocks.abs().amax(1).clamp_min(1e-12);            // (blocks)
  const torch::Tensor y = (blocks / scale.unsqueeze(1)).reshape({n});            // (n) in [-1, 1]
  const torch::Tensor code = nearest_codes(y, map);                             // (n) int32
  codes.copy_(code.view(codes.sizes()));
  scales.copy_(scale);
}

torch::Tensor dequantize_blockwise(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& map) {
  const int64_t blocks = scales.numel();
  return (map.index_select(0, codes.reshape({-1}).to(torch::kInt)).view({blocks, -1}) * scales.unsqueeze(1))
      .reshape({-1});  // (n)
}

}  // namespace gpt2ft
