// LoRA adapters, as PEFT's.
#include "gpt2ft/model/lora.h"

#include <cmath>

#include <set>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/strings.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/model/finetune.h"

namespace gpt2ft {
namespace fs = std::filesystem;
namespace {

constexpr const char* kPeftPrefix = "base_model.model.";

// The parameters modules_to_save carries: the token embedding, and an untied lm_head.
bool is_saved_embedding(GPT2& model, const std::string& name) {
  return name == "transformer.wte.weight" || (!model->config().tie_word_embeddings && name == "lm_head.weight");
}

// Every projection that can carry an adapter: its module name, base layer and adapter slot.
struct Slot {
  std::string name;
  torch::nn::Linear* base;
  LoraAdapter* adapter;
};

std::vector<Slot> projections(GPT2& model) {
  std::vector<Slot> out;
  for (size_t i = 0; i < model->transformer->h->size(); ++i) {
    BlockImpl& b = *model->transformer->h[i]->as<Block>();
    const std::string p = "transformer.h." + std::to_string(i) + ".";
    out.push_back({p + "attn.c_attn", &b.attn->c_attn, &b.attn->c_attn_lora});
    out.push_back({p + "attn.c_proj", &b.attn->c_proj, &b.attn->c_proj_lora});
    out.push_back({p + "mlp.c_fc", &b.mlp->c_fc, &b.mlp->c_fc_lora});
    out.push_back({p + "mlp.c_proj", &b.mlp->c_proj, &b.mlp->c_proj_lora});
  }
  return out;
}

}  // namespace

double LoraConfig::scaling() const {
  return rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

bool lora_targets(const std::string& module_name, const std::vector<std::string>& targets) {
  for (const auto& t : targets) {
    if (module_name == t || ends_with(module_name, "." + t)) return true;
  }
  return false;
}

bool is_lora_parameter(const std::string& name) {
  return ends_with(name, ".lora_A.weight") || ends_with(name, ".lora_B.weight");
}

void add_lora(GPT2& model, const LoraConfig& config) {
  if (config.rank < 1) throw Error("model.lora.rank: expected an integer >= 1 for LoRA, got " + std::to_string(config.rank));
  for (auto& p : model->parameters()) p.requires_grad_(false);
  const auto options = model->transformer->wte->weight.options();
  std::vector<std::string> matched;
  for (Slot& s : projections(model)) {
    if (!lora_targets(s.name, config.targets)) continue;
    matched.push_back(s.name);
    const auto& weight = (*s.base)->weight;  // (out, in)
    LoraAdapter& a = *s.adapter;
    a.A = torch::nn::Linear(torch::nn::LinearOptions(weight.size(1), config.rank).bias(false));
    a.B = torch::nn::Linear(torch::nn::LinearOptions(config.rank, weight.size(0)).bias(false));
    {
      torch::NoGradGuard no_grad;
      a.B->weight.zero_();  // the adapter starts as a no-op
    }
    a.A->to(options.device(), options.dtype().toScalarType());
    a.B->to(options.device(), options.dtype().toScalarType());
    a.scaling = config.scaling();
    a.dropout = config.dropout;
    (*s.base)->register_module("lora_A", a.A);
    (*s.base)->register_module("lora_B", a.B);
  }
  if (config.save_embeddings) {  // modules_to_save: trained in full, the base's kept for AdaptersOff
    model->keep_embeddings();
    model->transformer->wte->weight.requires_grad_(true);
    model->lm_head_weight().requires_grad_(true);
  }
  model->set_lora(config);
  for (const auto& t : config.targets) {
    bool used = false;
    for (const auto& m : matched) used = used || lora_targets(m, {t});
    if (!used) {
      throw Error("model.lora.targets: \"" + t + "\" matches no GPT-2 module (the projections are c_attn, c_proj and "
                  "c_fc)");
    }
  }
}

std::vector<std::pair<std::string, LoraAdapter*>> lora_adapters(GPT2& model) {
  std::vector<std::pair<std::string, LoraAdapter*>> out;
  for (Slot& s : projections(model)) {
    if (s.adapter->active()) out.emplace_back(s.name, s.adapter);
  }
  return out;
}

torch::Tensor lora_product(const LoraAdapter& adapter) {
  return torch::matmul(adapter.B->weight.to(torch::kFloat), adapter.A->weight.to(torch::kFloat));
}

void merge_lora(GPT2& model) {
  torch::NoGradGuard no_grad;
  for (Slot& s : projections(model)) {
    LoraAdapter& a = *s.adapter;
    if (!a.active()) continue;
    torch::Tensor& w = (*s.base)->weight;  // (out, in)
    w.add_(lora_product(a).to(w.scalar_type()), a.scaling);
    (*s.base)->unregister_module("lora_A");
    (*s.base)->unregister_module("lora_B");
    a = LoraAdapter{};
  }
  model->set_lora(std::nullopt);
}

AdaptersOff::AdaptersOff(GPT2& model) : model_(model) {
  for (auto& [name, adapter] : lora_adapters(model)) {
    adapter->enabled = false;
    adapters_.push_back(adapter);
  }
  if (model->has_kept_embeddings()) model->use_kept_embeddings(true);
}

AdaptersOff::~AdaptersOff() {
  for (LoraAdapter* adapter : adapters_) adapter->enabled = true;
  if (model_->has_kept_embeddings()) model_->use_kept_embeddings(false);
}

void cast_frozen_base(GPT2& model, c10::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  for (auto& item : model->named_parameters()) {
    torch::Tensor& p = item.value();
    if (!p.requires_grad()) p.set_data(p.to(dtype));
  }
}

LoraConfig read_adapter_config(const fs::path& dir) {
  const fs::path path = dir / "adapter_config.json";
  if (!fs::exists(path)) {
    throw Error(dir.string() + ": not a LoRA adapter folder (no adapter_config.json); PEFT's save_pretrained writes one");
  }
  const nlohmann::json j = read_json_file(path.string());
  const std::string where = path.string();
  if (!j.is_object()) throw Error(where + ": expected a JSON object, got " + j.type_name());
  auto field = [&](const char* key) -> const nlohmann::json& {
    if (!j.contains(key)) throw Error(where + ": missing \"" + std::string(key) + "\"");
    return j.at(key);
  };
  // Optional fields: absent or null means PEFT's default; any other type is an error, not a default.
  auto optional = [&](const char* key, nlohmann::json fallback, bool (nlohmann::json::*is_type)() const noexcept,
                      const char* expected) -> nlohmann::json {
    if (!j.contains(key) || j.at(key).is_null()) return fallback;
    if (!(j.at(key).*is_type)()) throw Error(where + ": " + key + " must be " + expected + ", got " + j.at(key).dump());
    return j.at(key);
  };
  if (field("peft_type") != "LORA") {
    throw Error(where + ": peft_type is " + field("peft_type").dump() + "; only LORA adapters are supported");
  }
  LoraConfig c;
  const nlohmann::json& r = field("r");
  if (!r.is_number_integer() || r.get<int64_t>() < 1 || r.get<int64_t>() > LoraConfig::kMaxRank) {
    throw Error(where + ": r must be an integer in [1, " + std::to_string(LoraConfig::kMaxRank) + "], got " + r.dump());
  }
  c.rank = r.get<int64_t>();
  if (!field("lora_alpha").is_number()) throw Error(where + ": lora_alpha must be a number");
  c.alpha = field("lora_alpha").get<double>();
  if (!(c.alpha > 0 && c.alpha <= 1e4)) {  // model.lora.alpha's range: beyond it the adapters' outputs overflow
    throw Error(where + ": lora_alpha must be in (0, 10000], got " + field("lora_alpha").dump());
  }
  c.dropout = optional("lora_dropout", 0.0, &nlohmann::json::is_number, "a number in [0, 1)").get<double>();
  if (!(c.dropout >= 0 && c.dropout < 1)) throw Error(where + ": lora_dropout must be in [0, 1), got " + std::to_string(c.dropout));
  c.rslora = optional("use_rslora", false, &nlohmann::json::is_boolean, "true or false").get<bool>();
  const nlohmann::json& targets = field("target_modules");
  c.targets.clear();
  if (targets.is_string()) {
    throw Error(where + ": target_modules is a regular expression (" + targets.dump() +
                "); give the module names as a list, e.g. [\"c_attn\", \"c_proj\"]");
  }
  if (!targets.is_array()) throw Error(where + ": target_modules must be a list of module names");
  for (const auto& t : targets) {
    if (!t.is_string()) throw Error(where + ": target_modules must be a list of module names");
    c.targets.push_back(t.get<std::string>());
  }
  if (c.targets.empty()) throw Error(where + ": target_modules is empty: the adapter would adapt nothing");
  const std::string bias = optional("bias", "none", &nlohmann::json::is_string, "a string").get<std::string>();
  if (bias != "none") throw Error(where + ": bias \"" + bias + "\" is not supported (only \"none\")");
  if (j.contains("modules_to_save") && !j["modules_to_save"].is_null() && !j["modules_to_save"].empty()) {
    const nlohmann::json& m = j["modules_to_save"];
    const auto names = m.is_array() ? m : nlohmann::json::array();
    for (const auto& name : names) {
      const bool embedding = name == "wte" || name == "transformer.wte" || name == "lm_head";
      if (!embedding) {
        throw Error(where + ": modules_to_save " + m.dump() + " is not supported (only the token embedding, \"wte\", "
                    "with the lm_head tied to it)");
      }
    }
    if (names.empty()) throw Error(where + ": modules_to_save must be a list of module names, got " + m.dump());
    c.save_embeddings = true;
  }
  // What PEFT can put in an adapter that this LoRA does not do: refused by name, not ignored.
  for (const char* key : {"rank_pattern", "alpha_pattern", "layers_to_transform", "exclude_modules",
                          "target_parameters", "trainable_token_indices"}) {
    if (j.contains(key) && !j[key].is_null() && !j[key].empty()) {
      throw Error(where + ": " + key + " " + j[key].dump() + " is not supported");
    }
  }
  for (const char* key : {"use_dora", "lora_bias", "use_qalora"}) {
    if (optional(key, false, &nlohmann::json::is_boolean, "true or false").get<bool>()) {
      throw Error(where + ": " + key + " is true; only plain LoRA is supported");
    }
  }
  // Any other option PEFT has or will have changes what the adapter computes unless it is at
  // its "off" value: refused, so that an adapter is never applied in part. What is known to
  // be metadata, or to matter only when the adapter is created, is let through.
  static const std::set<std::string> understood = {
      "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "bias", "modules_to_save",
      "ensure_weight_tying",
      "rank_pattern", "alpha_pattern", "layers_to_transform", "exclude_modules", "target_parameters",
      "trainable_token_indices", "use_dora", "lora_bias", "use_qalora",
      // metadata, or only read when PEFT creates the adapter:
      "base_model_name_or_path", "revision", "task_type", "inference_mode", "fan_in_fan_out", "init_lora_weights",
      "auto_mapping", "peft_version", "megatron_config", "megatron_core", "loftq_config", "layers_pattern",
      "runtime_config", "eva_config", "corda_config", "qalora_group_size", "lora_ga_config"};
  for (const auto& [key, value] : j.items()) {
    if (understood.count(key)) continue;
    const bool off = value.is_null() || (value.is_boolean() && !value.get<bool>()) ||
                     ((value.is_array() || value.is_object() || value.is_string()) && value.empty());
    if (!off) {
      throw Error(where + ": " + key + " " + value.dump() + " is a PEFT option gpt2-finetune does not implement; the "
                  "adapter would be applied in part. Merge it with PEFT instead");
    }
  }
  return c;
}

void load_adapter_weights(GPT2& model, const fs::path& dir) {
  with_context("loading LoRA adapter " + dir.string(), [&] {
    const fs::path file = dir / "adapter_model.safetensors";
    if (!fs::exists(file)) {
      throw Error(file.string() + ": missing" +
                  std::string(fs::exists(dir / "adapter_model.bin")
                                  ? " (the folder holds adapter_model.bin: load it with PEFT and save_pretrained it "
                                    "with safe_serialization=True)"
                                  : ""));
    }
    SafetensorsReader reader(file);
    const std::string hint = "the adapter does not match adapter_config.json or the base model";
    std::set<std::string> used;
    for (auto& item : model->named_parameters()) {
      const bool saved = model->lora() && model->lora()->save_embeddings && is_saved_embedding(model, item.key());
      if (!is_lora_parameter(item.key()) && !saved) continue;
      torch::NoGradGuard no_grad;
      reader.load_into(kPeftPrefix + item.key(), item.value(), hint);
      used.insert(kPeftPrefix + item.key());
    }
    // A tied model's saved lm_head is its embedding again (PEFT saves both): it must be equal.
    const std::string tied_head = std::string(kPeftPrefix) + "lm_head.weight";
    if (model->lora() && model->lora()->save_embeddings && model->config().tie_word_embeddings &&
        reader.entries().count(tied_head)) {
      torch::Tensor head = torch::empty_like(model->transformer->wte->weight);
      reader.load_into(tied_head, head, hint);
      if (!torch::equal(head, model->transformer->wte->weight)) {
        throw Error(file.string() + ": lm_head.weight differs from transformer.wte.weight, but the model ties them; "
                    "the adapter is for an untied model");
      }
      used.insert(tied_head);
    }
    // Every tensor must find its place: an extra one is an adapted module this model does not
    // adapt (outside target_modules, a layer the base does not have: a deeper base), and an
    // adapter applied in part is another model.
    std::vector<std::string> extra;
    for (const auto& [name, _] : reader.entries()) {
      if (!used.count(name)) extra.push_back(name);
    }
    if (!extra.empty()) {
      std::string list;
      for (size_t i = 0; i < std::min<size_t>(extra.size(), 4); ++i) list += (i ? ", " : "") + extra[i];
      throw Error(file.string() + ": " + std::to_string(extra.size()) + " tensor(s) this base model with "
                  "adapter_config.json's target_modules has no place for (" + list + (extra.size() > 4 ? ", ..." : "") +
                  "): the adapter is for another base (a deeper one?) or other modules; it is not applied in part");
    }
  });
}

void attach_adapter_folder(GPT2& model, const fs::path& dir) {
  const LoraConfig config = read_adapter_config(dir);
  if (config.save_embeddings) {  // the adapter's vocabulary may be the base's resized (a chat template's tokens)
    const fs::path file = dir / "adapter_model.safetensors";
    if (fs::exists(file)) {
      const SafetensorsReader reader(file);
      for (const auto& [name, entry] : reader.entries()) {
        if (name == std::string(kPeftPrefix) + "transformer.wte.weight" && !entry.shape.empty() &&
            entry.shape[0] != model->config().vocab_size) {
          model = resize_vocab(model, entry.shape[0]);
        }
      }
    }
  }
  add_lora(model, config);
  load_adapter_weights(model, dir);
}

void save_adapter_folder(GPT2& model, const LoraConfig& config, const fs::path& dir,
                         const std::string& base_model_name_or_path) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error(dir.string() + ": cannot create directory (" + ec.message() + ")");
  NamedTensors tensors;
  nlohmann::json modules_to_save = nullptr;
  for (const auto& item : model->named_parameters()) {
    const bool saved = config.save_embeddings && is_saved_embedding(model, item.key());
    if (is_lora_parameter(item.key()) || saved) tensors.emplace_back(kPeftPrefix + item.key(), item.value().detach());
  }
  // PEFT ties a saved lm_head to the embedding (ensure_weight_tying) only when modules_to_save
  // names "lm_head", and then loads both tensors; an untied model saves both modules.
  if (config.save_embeddings && model->config().tie_word_embeddings) {
    modules_to_save = nlohmann::json{"lm_head"};
    tensors.emplace_back(std::string(kPeftPrefix) + "lm_head.weight", model->transformer->wte->weight.detach());
  } else if (config.save_embeddings) {
    modules_to_save = nlohmann::json{"wte", "lm_head"};
  }
  save_safetensors(dir / "adapter_model.safetensors", tensors);
  const nlohmann::json cfg = {{"peft_type", "LORA"},
                              {"task_type", "CAUSAL_LM"},
                              {"base_model_name_or_path", base_model_name_or_path},
                              {"r", config.rank},
                              {"lora_alpha", config.alpha},
                              {"lora_dropout", config.dropout},
                              {"target_modules", config.targets},
                              {"fan_in_fan_out", true},
                              {"bias", "none"},
                              {"use_rslora", config.rslora},
                              {"modules_to_save", modules_to_save},
                              {"ensure_weight_tying", config.save_embeddings && model->config().tie_word_embeddings},
                              {"init_lora_weights", true},
                              {"inference_mode", true}};
  write_file_atomic(dir / "adapter_config.json", cfg.dump(2) + "\n");
}

}  // namespace gpt2ft
