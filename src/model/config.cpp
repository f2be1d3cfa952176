// GPT2Config parsing, validation and presets.
#include "gpt2ft/model/config.h"

#include <fstream>
#include <set>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/json.h"

namespace gpt2ft {
namespace {

using nlohmann::json;

struct ActivationName {
  const char* name;
  Activation activation;
};

// Hugging Face ACT2FN names we implement. gelu_new, gelu_fast and gelu_pytorch_tanh are
// the same tanh approximation; gelu is the exact erf form.
constexpr ActivationName kActivations[] = {
    {"gelu_new", Activation::kGeluNew},   {"gelu_pytorch_tanh", Activation::kGeluNew},
    {"gelu_fast", Activation::kGeluNew},  {"gelu", Activation::kGelu},
    {"relu", Activation::kRelu},          {"silu", Activation::kSilu},
    {"swish", Activation::kSilu},         {"quick_gelu", Activation::kQuickGelu},
    {"tanh", Activation::kTanh}};

std::string type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_string()) return "\"" + v.get<std::string>() + "\"";
  return v.dump();
}

int64_t get_int(const json& j, const char* key, int64_t fallback, const std::string& where) {
  if (!j.contains(key)) return fallback;
  const json& v = j.at(key);
  if (!v.is_number_integer()) {
    throw Error(where + ": " + key + ": expected an integer, got " + type_name(v));
  }
  return v.get<int64_t>();
}

double get_number(const json& j, const char* key, double fallback, const std::string& where) {
  if (!j.contains(key)) return fallback;
  const json& v = j.at(key);
  if (!v.is_number()) throw Error(where + ": " + key + ": expected a number, got " + type_name(v));
  return v.get<double>();
}

bool get_bool(const json& j, const char* key, bool fallback, const std::string& where) {
  if (!j.contains(key)) return fallback;
  const json& v = j.at(key);
  if (!v.is_boolean()) throw Error(where + ": " + key + ": expected true or false, got " + type_name(v));
  return v.get<bool>();
}

// Keys this struct owns; everything else is carried through in `extra`.
const std::set<std::string>& owned_keys() {
  static const std::set<std::string> keys = {
      "vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head", "n_inner",
      "layer_norm_epsilon", "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop",
      "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "model_type",
      "architectures"};
  return keys;
}

}  // namespace

Activation GPT2Config::activation() const {
  for (const auto& a : kActivations) {
    if (activation_function == a.name) return a.activation;
  }
  std::string known;
  for (const auto& a : kActivations) known += std::string(known.empty() ? "" : ", ") + a.name;
  throw Error("activation_function: unsupported \"" + activation_function + "\" (expected one of " +
              known + ")");
}

int64_t GPT2Config::num_parameters() const {
  const int64_t C = n_embd, I = inner_dim();
  const int64_t per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * I + I) + (I * C + C);
  int64_t total = vocab_size * C + n_positions * C + n_layer * per_block + 2 * C;
  if (!tie_word_embeddings) total += vocab_size * C;
  return total;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> GPT2Config::parameter_shapes() const {
  const int64_t C = n_embd, I = inner_dim();
  std::vector<std::pair<std::string, std::vector<int64_t>>> out = {{"transformer.wte.weight", {vocab_size, C}},
                                                                   {"transformer.wpe.weight", {n_positions, C}}};
  for (int64_t i = 0; i < n_layer; ++i) {
    const std::string b = "transformer.h." + std::to_string(i) + ".";
    out.insert(out.end(), {{b + "ln_1.weight", {C}},
                           {b + "ln_1.bias", {C}},
                           {b + "attn.c_attn.weight", {3 * C, C}},
                           {b + "attn.c_attn.bias", {3 * C}},
                           {b + "attn.c_proj.weight", {C, C}},
                           {b + "attn.c_proj.bias", {C}},
                           {b + "ln_2.weight", {C}},
                           {b + "ln_2.bias", {C}},
                           {b + "mlp.c_fc.weight", {I, C}},
                           {b + "mlp.c_fc.bias", {I}},
                           {b + "mlp.c_proj.weight", {C, I}},
                           {b + "mlp.c_proj.bias", {C}}});
  }
  out.push_back({"transformer.ln_f.weight", {C}});
  out.push_back({"transformer.ln_f.bias", {C}});
  if (!tie_word_embeddings) out.push_back({"lm_head.weight", {vocab_size, C}});
  return out;
}

void GPT2Config::validate(const std::string& where) const {
  // Each size within what any GPT-2-shaped model uses, far beyond the released ones, so that
  // a damaged config.json is refused here instead of aborting in the allocator.
  auto require_in = [&](const char* key, int64_t v, int64_t hi) {
    if (v < 1 || v > hi) {
      throw Error(where + ": " + key + ": expected an integer in [1, " + std::to_string(hi) + "], got " +
                  std::to_string(v));
    }
  };
  require_in("vocab_size", vocab_size, kMaxVocab);
  require_in("n_positions", n_positions, kMaxPositions);
  require_in("n_embd", n_embd, kMaxWidth);
  require_in("n_layer", n_layer, kMaxLayers);
  require_in("n_head", n_head, n_embd);
  if (n_inner) require_in("n_inner", *n_inner, 8 * kMaxWidth);
  if (n_embd % n_head != 0) {
    throw Error(where + ": n_embd (" + std::to_string(n_embd) + ") must be divisible by n_head (" +
                std::to_string(n_head) + ")");
  }
  if (!(layer_norm_epsilon > 0)) throw Error(where + ": layer_norm_epsilon: expected a number > 0");
  for (const auto& [key, p] : {std::pair<const char*, double>{"resid_pdrop", resid_pdrop},
                               {"embd_pdrop", embd_pdrop},
                               {"attn_pdrop", attn_pdrop}}) {
    if (!(p >= 0 && p < 1)) {
      throw Error(where + ": " + key + ": expected a probability in [0, 1), got " + std::to_string(p));
    }
  }
  with_context(where, [&] { (void)activation(); });
}

double GPT2Config::weight_bytes() const {
  const double C = static_cast<double>(n_embd), I = static_cast<double>(inner_dim());
  const double per_block = 4 * C + 3 * C * C + 3 * C + C * C + C + C * I + I + I * C + C;
  const double embeddings = static_cast<double>(vocab_size) * C * (tie_word_embeddings ? 1 : 2) +
                            static_cast<double>(n_positions) * C;
  return 4 * (embeddings + static_cast<double>(n_layer) * per_block + 2 * C);
}

GPT2Config GPT2Config::from_json(const json& j, const std::string& where) {
  if (!j.is_object()) throw Error(where + ": expected a JSON object");
  if (j.contains("model_type") && j["model_type"] != "gpt2") {
    throw Error(where + ": model_type: expected \"gpt2\", got " + type_name(j["model_type"]) +
                " (only GPT-2-shaped models are supported)");
  }
  // Attention variants GPT2LMHeadModel offers that we do not implement: refuse rather than
  // silently compute something else.
  if (get_bool(j, "scale_attn_by_inverse_layer_idx", false, where) ||
      get_bool(j, "reorder_and_upcast_attn", false, where) ||
      !get_bool(j, "scale_attn_weights", true, where)) {
    throw Error(where +
                ": scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn / scale_attn_weights=false "
                "are not supported; only standard GPT-2 attention is");
  }
  GPT2Config c;
  c.vocab_size = get_int(j, "vocab_size", c.vocab_size, where);
  c.n_positions = get_int(j, "n_positions", get_int(j, "n_ctx", c.n_positions, where), where);
  c.n_embd = get_int(j, "n_embd", c.n_embd, where);
  c.n_layer = get_int(j, "n_layer", c.n_layer, where);
  c.n_head = get_int(j, "n_head", c.n_head, where);
  if (j.contains("n_inner") && !j["n_inner"].is_null()) c.n_inner = get_int(j, "n_inner", 0, where);
  c.layer_norm_epsilon = get_number(j, "layer_norm_epsilon", c.layer_norm_epsilon, where);
  if (j.contains("activation_function")) {
    if (!j["activation_function"].is_string()) {
      throw Error(where + ": activation_function: expected a string, got " +
                  type_name(j["activation_function"]));
    }
    c.activation_function = j["activation_function"].get<std::string>();
  }
  c.resid_pdrop = get_number(j, "resid_pdrop", c.resid_pdrop, where);
  c.embd_pdrop = get_number(j, "embd_pdrop", c.embd_pdrop, where);
  c.attn_pdrop = get_number(j, "attn_pdrop", c.attn_pdrop, where);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", c.tie_word_embeddings, where);
  c.initializer_range = get_number(j, "initializer_range", c.initializer_range, where);
  for (const auto& [key, id] : {std::pair{"bos_token_id", &c.bos_token_id}, std::pair{"eos_token_id", &c.eos_token_id}}) {
    if (j.contains(key)) *id = j[key].is_null() ? std::nullopt : std::optional<int64_t>(get_int(j, key, 0, where));
  }
  for (const auto& [key, value] : j.items()) {
    if (!owned_keys().count(key)) c.extra[key] = value;
  }
  c.validate(where);
  return c;
}

GPT2Config GPT2Config::from_file(const std::filesystem::path& path) {
  const std::string text = read_text_file(path);
  json j;
  try {
    j = parse_json_limited(text, path.string());
  } catch (const json::exception& e) {
    throw Error(path.string() + ": not valid JSON (" + e.what() + ")");
  }
  return from_json(j, path.string());
}

std::vector<std::string> GPT2Config::preset_names() {
  return {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"};
}

GPT2Config GPT2Config::preset(const std::string& name) {
  GPT2Config c;
  auto shape = [&](int64_t layers, int64_t heads, int64_t embd) {
    c.n_layer = layers;
    c.n_head = heads;
    c.n_embd = embd;
  };
  if (name == "gpt2") shape(12, 12, 768);
  else if (name == "gpt2-medium") shape(24, 16, 1024);
  else if (name == "gpt2-large") shape(36, 20, 1280);
  else if (name == "gpt2-xl") shape(48, 25, 1600);
  else if (name == "distilgpt2") shape(6, 12, 768);
  else {
    std::string names;
    for (const auto& n : preset_names()) names += (names.empty() ? "" : ", ") + n;
    throw Error("unknown preset \"" + name + "\" (expected one of " + names + ")");
  }
  return c;
}

json GPT2Config::to_json() const {
  json j = extra;
  j["model_type"] = "gpt2";
  j["architectures"] = {"GPT2LMHeadModel"};
  j["vocab_size"] = vocab_size;
  j["n_positions"] = n_positions;
  j["n_ctx"] = n_positions;
  j["n_embd"] = n_embd;
  j["n_layer"] = n_layer;
  j["n_head"] = n_head;
  j["n_inner"] = n_inner ? json(*n_inner) : json(nullptr);
  j["layer_norm_epsilon"] = layer_norm_epsilon;
  j["activation_function"] = activation_function;
  j["resid_pdrop"] = resid_pdrop;
  j["embd_pdrop"] = embd_pdrop;
  j["attn_pdrop"] = attn_pdrop;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["initializer_range"] = initializer_range;
  j["bos_token_id"] = bos_token_id ? json(*bos_token_id) : json(nullptr);
  j["eos_token_id"] = eos_token_id ? json(*eos_token_id) : json(nullptr);
  return j;
}

bool GPT2Config::drop_special_ids_outside_vocab() {
  bool dropped = false;
  for (std::optional<int64_t>* id : {&bos_token_id, &eos_token_id}) {
    if (*id && (**id < 0 || **id >= vocab_size)) {
      id->reset();
      dropped = true;
    }
  }
  return dropped;
}

}  // namespace gpt2ft
