// The settings of a model's LoRA adapters (model/lora.h), as adapter_config.json holds them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace gpt2ft {

struct LoraConfig {
  static constexpr int64_t kMaxRank = 65536;  // bound on r, from a config or an adapter folder

  int64_t rank = 0;    // r
  double alpha = 8;    // lora_alpha
  double dropout = 0;  // lora_dropout
  std::vector<std::string> targets = {"c_attn"};  // target_modules
  bool rslora = false;  // use_rslora: scaling alpha / sqrt(r)
  // modules_to_save ["wte"]: the token embedding (and so the lm_head tied to it) is trained in
  // full and saved with the adapter, as PEFT saves modules_to_save. Set when a chat template
  // added tokens whose rows must be learnt.
  bool save_embeddings = false;

  double scaling() const;
};

}  // namespace gpt2ft
