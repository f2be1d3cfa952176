// Sampling loop over the KV-cached forward pass.
#include "gpt2ft/model/generate.h"

#include <algorithm>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/error.h"

namespace gpt2ft {

std::vector<int64_t> generate(GPT2& model, const std::vector<int64_t>& prompt, const GenerateOptions& o) {
  const GPT2Config& c = model->config();
  if (prompt.empty()) throw Error("generate: the prompt is empty");
  if (static_cast<int64_t>(prompt.size()) >= c.n_positions) {
    throw Error("generate: the prompt has " + std::to_string(prompt.size()) + " tokens; the model's n_positions is " +
                std::to_string(c.n_positions));
  }
  for (int64_t id : prompt) {
    if (id < 0 || id >= c.vocab_size) throw Error("generate: prompt token id " + std::to_string(id) + " is outside the vocabulary");
  }
  torch::NoGradGuard no_grad;
  model->eval();
  const auto device = model->transformer->wte->weight.device();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  const int64_t capacity = std::min<int64_t>(c.n_positions, static_cast<int64_t>(prompt.size()) + o.max_new_tokens);
  if (static_cast<int64_t>(prompt.size()) + o.max_new_tokens > c.n_positions) {
    spdlog::warn("generate: a {}-token prompt and {} new tokens exceed the model's n_positions ({}): at most {} new "
                 "tokens will be generated", prompt.size(), o.max_new_tokens, c.n_positions,
                 c.n_positions - static_cast<int64_t>(prompt.size()));
  }
  KVCache cache = model->make_cache(1, capacity);
  torch::Tensor input = torch::tensor(prompt, torch::kLong).view({1, -1}).to(device);  // (1, t)
  std::vector<int64_t> out;
  while (static_cast<int64_t>(out.size()) < o.max_new_tokens && cache.length < capacity) {
    torch::Tensor logits = model->forward_cached(input, cache).select(1, -1).squeeze(0).to(torch::kCPU, torch::kFloat);  // (V)
    int64_t next;
    if (o.temperature <= 0) {
      next = logits.argmax().item<int64_t>();
    } else {
      logits = logits / o.temperature;
      if (o.top_k > 0 && o.top_k < logits.size(0)) {
        const torch::Tensor kth = std::get<0>(logits.topk(o.top_k)).min();
        logits = logits.masked_fill(logits < kth, -INFINITY);
      }
      if (o.top_p < 1.0) {
        auto [sorted, order] = logits.sort(/*dim=*/0, /*descending=*/true);
        const torch::Tensor cumulative = sorted.softmax(0).cumsum(0);
        torch::Tensor drop = cumulative - sorted.softmax(0) > o.top_p;  // keep the smallest set reaching top_p
        logits = logits.index_put({order.masked_select(drop)}, torch::tensor(-INFINITY));
      }
      next = torch::multinomial(logits.softmax(0), 1, /*replacement=*/false, gen).item<int64_t>();
    }
    out.push_back(next);
    if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), next) != o.stop_tokens.end()) break;
    input = torch::full({1, 1}, next, torch::TensorOptions().dtype(torch::kLong).device(device));
  }
  return out;
}

}  // namespace gpt2ft
