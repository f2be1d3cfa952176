// GPT2Config: the architecture hyper-parameters, read from and written to a Hugging Face
// config.json, plus the named presets of the released GPT-2 family.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace gpt2ft {

enum class Activation { kGeluNew, kGelu, kRelu, kSilu, kQuickGelu, kTanh };

struct GPT2Config {
  int64_t vocab_size = 50257;
  int64_t n_positions = 1024;
  int64_t n_embd = 768;
  int64_t n_layer = 12;
  int64_t n_head = 12;
  std::optional<int64_t> n_inner;  // MLP width; 4 * n_embd when absent or null
  double layer_norm_epsilon = 1e-5;
  std::string activation_function = "gelu_new";
  double resid_pdrop = 0.1;
  double embd_pdrop = 0.1;
  double attn_pdrop = 0.1;
  bool tie_word_embeddings = true;
  double initializer_range = 0.02;
  // Special token ids (GPT-2's <|endoftext|> unless config.json says otherwise); none (null in
  // config.json) when the vocabulary has no such token.
  std::optional<int64_t> bos_token_id = 50256;
  std::optional<int64_t> eos_token_id = 50256;
  // Fields of the source config.json we do not interpret, written back unchanged.
  nlohmann::json extra = nlohmann::json::object();

  int64_t inner_dim() const { return n_inner.value_or(4 * n_embd); }
  int64_t head_dim() const { return n_embd / n_head; }
  Activation activation() const;
  int64_t num_parameters() const;
  // Every parameter's name and shape, in the order GPT2's named_parameters() lists them.
  std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes() const;

  // Drops a special id that lies outside the vocabulary (transformers warns about it and
  // generation would never stop); returns whether it dropped one.
  bool drop_special_ids_outside_vocab();

  // Checks every field; `where` names the source (file or preset) in the error.
  void validate(const std::string& where) const;
  // float32 bytes of all parameters, computed without overflow (for checks before building).
  double weight_bytes() const;

  // Upper bounds validate() enforces: generous for any GPT-2-shaped model.
  static constexpr int64_t kMaxVocab = 1 << 24, kMaxPositions = 1 << 20, kMaxWidth = 1 << 16, kMaxLayers = 4096;

  // Parses Hugging Face config.json contents. Errors name `where` and the key.
  static GPT2Config from_json(const nlohmann::json& j, const std::string& where);
  static GPT2Config from_file(const std::filesystem::path& path);
  // gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2.
  static GPT2Config preset(const std::string& name);
  static std::vector<std::string> preset_names();

  // A config.json that transformers.GPT2LMHeadModel.from_pretrained accepts.
  nlohmann::json to_json() const;
};

}  // namespace gpt2ft
