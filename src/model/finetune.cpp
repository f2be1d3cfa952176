// Freezing and vocabulary resizing.
#include "gpt2ft/model/finetune.h"

#include <torch/torch.h>

#include "gpt2ft/core/error.h"

namespace gpt2ft {

void freeze(GPT2& model, bool embeddings, int64_t blocks) {
  const int64_t L = model->config().n_layer;
  if (blocks > L) {
    throw Error("model.freeze_blocks: " + std::to_string(blocks) + " is more than the model's " + std::to_string(L) +
                " blocks");
  }
  for (auto& item : model->named_parameters()) {
    if (is_frozen(item.key(), embeddings, blocks)) item.value().requires_grad_(false);
  }
}

bool is_frozen(const std::string& name, bool embeddings, int64_t blocks) {
  if (embeddings && (name == "transformer.wte.weight" || name == "transformer.wpe.weight")) return true;
  const std::string prefix = "transformer.h.";
  if (name.rfind(prefix, 0) != 0) return false;
  return std::stoll(name.substr(prefix.size())) < blocks;  // "transformer.h.<i>.…"
}

GPT2 resize_vocab(GPT2& model, int64_t vocab_size) {
  GPT2Config config = model->config();
  const int64_t old_vocab = config.vocab_size;
  config.vocab_size = vocab_size;
  config.drop_special_ids_outside_vocab();  // a smaller vocabulary may lose <|endoftext|>
  GPT2 resized(config);
  torch::NoGradGuard no_grad;
  auto old_params = model->named_parameters();
  const auto device = model->transformer->wte->weight.device();
  resized->to(device);
  for (auto& item : resized->named_parameters()) {
    const torch::Tensor& old = old_params[item.key()];
    torch::Tensor& p = item.value();
    if (item.key() == "transformer.wte.weight" || item.key() == "lm_head.weight") {
      const int64_t keep = std::min(old_vocab, vocab_size);
      p.narrow(0, 0, keep).copy_(old.narrow(0, 0, keep));
      if (vocab_size > old_vocab)
        p.narrow(0, old_vocab, vocab_size - old_vocab).copy_(old.mean(0).expand({vocab_size - old_vocab, -1}));
    } else {
      p.copy_(old);
    }
  }
  resized->set_activation_checkpointing(model->activation_checkpointing());
  return resized;
}

}  // namespace gpt2ft
