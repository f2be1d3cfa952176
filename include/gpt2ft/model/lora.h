// LoRA fine-tuning of GPT-2 the way PEFT does it, so that adapters travel both ways:
//
//   targets      GPT-2 module names matched as PEFT matches target_modules: a module whose
//                name is a target or ends with "." + target ("c_proj" is attn.c_proj and
//                mlp.c_proj); c_attn, c_proj and c_fc are the projections that can carry one
//   A, B         A (r, in) Kaiming-uniform (a = sqrt(5), nn.Linear's default), B (out, r) zeros
//   scaling      lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)
//   dropout      on the adapter's input only
//
// An adapter folder is PEFT's: adapter_config.json (peft_type LORA, r, lora_alpha,
// lora_dropout, target_modules, fan_in_fan_out true for GPT-2's Conv1D, bias "none",
// base_model_name_or_path) and adapter_model.safetensors with the tensors named
// "base_model.model.<module>.lora_A.weight" / ".lora_B.weight", A and B in nn.Linear layout
// (no transposition, unlike the Conv1D base weights).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <c10/core/ScalarType.h>

#include "gpt2ft/model/gpt2.h"

namespace gpt2ft {

// (LoraConfig is in model/lora_config.h.)

// Whether PEFT would put an adapter on the module `module_name` (e.g. "transformer.h.0.attn.c_proj").
bool lora_targets(const std::string& module_name, const std::vector<std::string>& targets);
// Whether a parameter name is an adapter's (".lora_A.weight" / ".lora_B.weight").
bool is_lora_parameter(const std::string& name);

// Puts an adapter on every targeted projection (A initialised from the current RNG, B zeros)
// and freezes every other parameter but, with save_embeddings (modules_to_save), the
// embeddings, whose current weights it keeps frozen beside them (GPT2Impl::keep_embeddings). A target that matches nothing is an Error.
void add_lora(GPT2& model, const LoraConfig& config);
// The model's adapters by module name, or none.
std::vector<std::pair<std::string, LoraAdapter*>> lora_adapters(GPT2& model);

// While it lives, the model computes with its base alone, as PEFT's disable_adapter(): every
// adapter switched off and, with modules_to_save, the embeddings as they were when the
// adapters were added (kept frozen by add_lora): a preference reference without a second model.
class AdaptersOff {
 public:
  explicit AdaptersOff(GPT2& model);
  ~AdaptersOff();
  AdaptersOff(const AdaptersOff&) = delete;
  AdaptersOff& operator=(const AdaptersOff&) = delete;

 private:
  GPT2 model_;
  std::vector<LoraAdapter*> adapters_;
};

// B A (out, in) of an adapter, in float32: scaled by its scaling, its term of the projection's weight.
torch::Tensor lora_product(const LoraAdapter& adapter);

// Folds every adapter into its base weight (W += scaling * B A) and removes the adapters.
void merge_lora(GPT2& model);

// Casts the frozen (base) parameters to `dtype` (float16/bfloat16), keeping the adapters in
// float32: the frozen base then costs 2 bytes a parameter.
void cast_frozen_base(GPT2& model, c10::ScalarType dtype);

// adapter_config.json of a PEFT LoRA adapter folder; what we cannot honour is an Error
// naming the file and key.
LoraConfig read_adapter_config(const std::filesystem::path& dir);
// Loads adapter_model.safetensors into the model's adapters (which must match its config).
void load_adapter_weights(GPT2& model, const std::filesystem::path& dir);
// A PEFT adapter folder put on the model (read_adapter_config + add_lora + load_adapter_weights).
void attach_adapter_folder(GPT2& model, const std::filesystem::path& dir);
// Writes adapter_config.json and adapter_model.safetensors (atomically, each file).
void save_adapter_folder(GPT2& model, const LoraConfig& config, const std::filesystem::path& dir,
                         const std::string& base_model_name_or_path);

}  // namespace gpt2ft
