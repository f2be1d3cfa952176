// Loading and saving Hugging Face GPT-2 model folders.
#include "gpt2ft/io/model_folder.h"

#include <map>
#include <memory>
#include <set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/strings.h"
#include "gpt2ft/model/lora.h"
#include "gpt2ft/data/chat_documents.h"
#include "gpt2ft/tokenizer/chat_template.h"
#include "gpt2ft/tokenizer/tokenizer.h"

namespace gpt2ft {
namespace fs = std::filesystem;
namespace {

constexpr const char* kPrefix = "transformer.";

// Hugging Face's GPT-2 uses Conv1D, which stores weights (in, out); ours are (out, in).
bool is_conv1d_weight(const std::string& name) {
  return ends_with(name, "attn.c_attn.weight") || ends_with(name, "attn.c_proj.weight") ||
         ends_with(name, "mlp.c_fc.weight") || ends_with(name, "mlp.c_proj.weight");
}

// Checkpoint keys a file may use for one of our parameter names: the full name, then the
// bare one that the original OpenAI conversions (and GPT2Model) use.
std::vector<std::string> checkpoint_keys(const std::string& param) {
  std::vector<std::string> keys = {param};
  if (param.rfind(kPrefix, 0) == 0) keys.push_back(param.substr(std::string(kPrefix).size()));
  return keys;
}

// Buffers old checkpoints carry that are not parameters.
bool is_ignorable_key(const std::string& key) {
  return ends_with(key, ".attn.bias") || ends_with(key, ".attn.masked_bias");
}

std::string shape_text(c10::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// All tensors of a folder, from one file or from the shards an index names.
class CheckpointFiles {
 public:
  explicit CheckpointFiles(const fs::path& dir) {
    const fs::path single = dir / "model.safetensors";
    const fs::path index = dir / "model.safetensors.index.json";
    if (fs::exists(single)) {
      add(single);
    } else if (fs::exists(index)) {
      nlohmann::json j;
      try {
        j = parse_json_limited(read_text_file(index), index.string());
      } catch (const nlohmann::json::exception& e) {
        throw Error(index.string() + ": not valid JSON (" + e.what() + ")");
      }
      if (!j.contains("weight_map") || !j["weight_map"].is_object()) {
        throw Error(index.string() + ": expected a \"weight_map\" object");
      }
      std::set<std::string> files;
      for (const auto& [name, file] : j["weight_map"].items()) {
        if (!file.is_string()) throw Error(index.string() + ": weight_map." + name + " is not a file name");
        files.insert(file.get<std::string>());
      }
      for (const auto& file : files) add(dir / file);
    } else if (fs::exists(dir / "pytorch_model.bin")) {
      throw Error(dir.string() +
                  ": has only pytorch_model.bin; convert it to safetensors first, e.g. "
                  "python -c \"from transformers import GPT2LMHeadModel as M; "
                  "M.from_pretrained('DIR').save_pretrained('DIR')\"");
    } else {
      throw Error(dir.string() + ": no model.safetensors (or model.safetensors.index.json) found");
    }
  }

  const SafetensorsReader* find(const std::string& key) const {
    const auto it = owner_.find(key);
    return it == owner_.end() ? nullptr : it->second;
  }
  std::vector<std::string> keys() const {
    std::vector<std::string> out;
    for (const auto& [key, reader] : owner_) out.push_back(key);
    return out;
  }

 private:
  void add(const fs::path& file) {
    readers_.push_back(std::make_unique<SafetensorsReader>(file));
    for (const auto& [name, entry] : readers_.back()->entries()) owner_[name] = readers_.back().get();
  }

  std::vector<std::unique_ptr<SafetensorsReader>> readers_;
  std::map<std::string, const SafetensorsReader*> owner_;
};

}  // namespace

const std::vector<std::string>& tokenizer_file_names() {
  static const std::vector<std::string> names = {
      "vocab.json",   "merges.txt",  "tokenizer.json",  "tokenizer_config.json",
      "special_tokens_map.json", "encoder.json", "vocab.bpe", "tokenizer.model",
      "generation_config.json", "chat_template.jinja"};
  return names;
}

void load_weights(GPT2& model, const fs::path& dir) {
  const GPT2Config& config = model->config();
  CheckpointFiles files(dir);
  torch::NoGradGuard no_grad;
  std::set<std::string> used;
  for (auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    if (is_lora_parameter(name)) continue;  // adapters live in adapter folders
    torch::Tensor& param = item.value();
    const SafetensorsReader* reader = nullptr;
    std::string key;
    for (const auto& candidate : checkpoint_keys(name)) {
      if ((reader = files.find(candidate))) {
        key = candidate;
        break;
      }
    }
    if (!reader) {
      const auto keys = checkpoint_keys(name);
      throw Error("missing tensor \"" + name + "\"" + (keys.size() > 1 ? " (also looked for \"" + keys[1] + "\")" : "") +
                  "; is this a GPT-2 checkpoint matching config.json?");
    }
    used.insert(key);
    const SafetensorsEntry& entry = reader->entry(key);
    const bool transpose = is_conv1d_weight(name);
    std::vector<int64_t> expected = param.sizes().vec();
    if (transpose) std::swap(expected[0], expected[1]);
    if (entry.shape != expected) {
      throw Error(reader->path().string() + ": tensor \"" + key + "\": expected shape " + shape_text(expected) +
                  " from config.json, found " + shape_text(entry.shape));
    }
    if (!c10::isFloatingType(entry.scalar_type)) {
      throw Error(reader->path().string() + ": tensor \"" + key +
                  "\": expected a floating dtype (F32, F16, BF16), found " + entry.dtype);
    }
    torch::Tensor value = reader->load(key, param.scalar_type());
    param.copy_(transpose ? value.t() : value);
  }
  std::vector<std::string> unexpected;
  for (const auto& key : files.keys()) {
    const bool tied_head = key == "lm_head.weight" && config.tie_word_embeddings;
    if (!used.count(key) && !tied_head && !is_ignorable_key(key)) unexpected.push_back(key);
  }
  if (!unexpected.empty()) {
    std::string list;
    for (size_t i = 0; i < unexpected.size() && i < 5; ++i) list += (i ? ", " : "") + unexpected[i];
    spdlog::warn("{}: ignoring {} tensor(s) that are not GPT-2 parameters: {}{}", dir.string(), unexpected.size(), list,
                 unexpected.size() > 5 ? ", ..." : "");
  }
}

namespace {

// Every tensor config.json implies has its shape in the files, checked from the headers
// before anything is allocated (a damaged config.json must not size the model).
void check_shapes_before_building(const GPT2Config& config, const CheckpointFiles& files) {
  for (const auto& [name, shape] : config.parameter_shapes()) {
    for (const auto& key : checkpoint_keys(name)) {
      const SafetensorsReader* reader = files.find(key);
      if (!reader) continue;
      std::vector<int64_t> expected = shape;
      if (is_conv1d_weight(name)) std::swap(expected[0], expected[1]);
      const auto& found = reader->entry(key).shape;
      if (found != expected) {
        throw Error(reader->path().string() + ": tensor \"" + key + "\": expected shape " + shape_text(expected) +
                    " from config.json, found " + shape_text(found));
      }
      break;
    }
  }
}

}  // namespace

GPT2 load_model_folder(const fs::path& dir, c10::Device device, const std::function<void(GPT2Config&)>& adjust) {
  return with_context("loading model folder " + dir.string(), [&] {
    if (!fs::is_directory(dir)) throw Error(dir.string() + ": not a directory");
    GPT2Config config = GPT2Config::from_file(dir / "config.json");
    if (adjust) adjust(config);
    check_shapes_before_building(config, CheckpointFiles(dir));
    GPT2 model(config);
    load_weights(model, dir);
    model->to(device);
    return model;
  });
}

torch::Tensor to_checkpoint_layout(const std::string& name, const torch::Tensor& tensor) {
  return is_conv1d_weight(name) ? tensor.t() : tensor;
}

NamedTensors to_checkpoint_tensors(GPT2& model, c10::ScalarType dtype) {
  NamedTensors out;
  for (const auto& item : model->named_parameters()) {
    if (is_lora_parameter(item.key())) continue;  // adapters live in adapter folders
    torch::Tensor t = to_checkpoint_layout(item.key(), item.value().detach());
    out.emplace_back(item.key(), t.to(torch::kCPU, dtype).contiguous());
  }
  return out;
}

void save_model_folder(GPT2& model, const fs::path& dir, const SaveModelOptions& options) {
  with_context("saving model folder " + dir.string(), [&] {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) throw Error(dir.string() + ": cannot create directory (" + ec.message() + ")");
    save_safetensors(dir / "model.safetensors", to_checkpoint_tensors(model, options.dtype));
    nlohmann::json config = model->config().to_json();
    config["torch_dtype"] = options.dtype == c10::kBFloat16 ? "bfloat16"
                            : options.dtype == c10::kHalf   ? "float16"
                                                            : "float32";
    write_file_atomic(dir / "config.json", config.dump(2) + "\n");
    if (options.tokenizer_from) copy_tokenizer_files(*options.tokenizer_from, dir);
  });
}

void check_model_output(const fs::path& dir, bool overwrite, const std::string& flag) {
  if (fs::exists(dir) && !fs::is_directory(dir)) {
    throw Error(flag + " " + dir.string() + ": exists and is not a folder");
  }
  if (overwrite) return;
  for (const char* name : {"model.safetensors", "model.safetensors.index.json", "config.json"}) {
    if (fs::exists(dir / name)) {
      throw Error(flag + " " + dir.string() + " already holds a model (" + name +
                  "); pass --overwrite to replace it, or choose another folder");
    }
  }
}

namespace {

// merges text as transformers reads merges.txt: its slow tokenizer drops the first line
// unread, so a "#version" header always comes first; LF line endings.
std::string hf_merges_text(const std::string& text) {
  std::string out = "#version: 0.2\n", line;
  for (size_t i = 0; i <= text.size(); ++i) {
    const char c = i < text.size() ? text[i] : '\n';
    if (c != '\n' && c != '\r') {
      line += c;
      continue;
    }
    if (!line.empty() && line.rfind("#version", 0) != 0) out += line + "\n";
    line.clear();
  }
  return out;
}

}  // namespace

void copy_tokenizer_files(const fs::path& from, const fs::path& dir) {
  if (fs::is_regular_file(from)) {  // a SentencePiece .model
    write_file_atomic(dir / "tokenizer.model", read_text_file(from));
    return;
  }
  if (fs::absolute(from) == fs::absolute(dir)) return;
  // What transformers reads: OpenAI's encoder.json + vocab.bpe are written as vocab.json +
  // merges.txt (the same tables; transformers does not know the OpenAI names and would load a
  // one-token vocabulary without a word).
  const bool hf_pair = fs::exists(from / "vocab.json") && fs::exists(from / "merges.txt");
  const bool openai_pair = fs::exists(from / "encoder.json") && fs::exists(from / "vocab.bpe");
  if (hf_pair || openai_pair) {
    write_file_atomic(dir / "vocab.json", read_text_file(from / (hf_pair ? "vocab.json" : "encoder.json")));
    write_file_atomic(dir / "merges.txt", hf_merges_text(read_text_file(from / (hf_pair ? "merges.txt" : "vocab.bpe"))));
  }
  for (const auto& name : tokenizer_file_names()) {
    if (name == "vocab.json" || name == "merges.txt" || name == "encoder.json" || name == "vocab.bpe") continue;
    const fs::path src = from / name;
    if (fs::exists(src)) write_file_atomic(dir / name, read_text_file(src));
  }
  // Without a tokenizer_config.json transformers assumes GPT-2's special tokens: name ours.
  if ((hf_pair || openai_pair) && !fs::exists(from / "tokenizer_config.json")) {
    const auto tokenizer = load_tokenizer(from);
    nlohmann::json config = {{"tokenizer_class", "GPT2Tokenizer"}, {"add_prefix_space", false}};
    if (const auto eot = tokenizer->eot_id()) {
      const std::string token = tokenizer->decode({*eot});
      config["bos_token"] = config["eos_token"] = config["unk_token"] = token;
    }
    write_file_atomic(dir / "tokenizer_config.json", config.dump(2) + "\n");
  }
}

void write_chat_tokenizer_files(const ShardChat& chat, const fs::path& dir) {
  const fs::path config_file = dir / "tokenizer_config.json";
  nlohmann::json config = fs::exists(config_file) ? read_json_file(config_file.string()) : nlohmann::json::object();
  if (!config.is_object()) config = nlohmann::json::object();
  config["chat_template"] = chat.template_source;
  nlohmann::json& decoder = config["added_tokens_decoder"];
  if (!decoder.is_object()) decoder = nlohmann::json::object();
  std::vector<std::string> tokens = {"<|endoftext|>"};
  std::vector<int64_t> ids = {chat.base_vocab_size - 1};  // GPT-2's end of text is its last base id
  for (size_t i = 0; i < chat.added_tokens.size(); ++i) {
    tokens.push_back(chat.added_tokens[i]);
    ids.push_back(chat.base_vocab_size + static_cast<int64_t>(i));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (i == 0 && decoder.contains(std::to_string(ids[0]))) continue;
    decoder[std::to_string(ids[i])] = {{"content", tokens[i]}, {"lstrip", false}, {"normalized", false},
                                       {"rstrip", false}, {"single_word", false}, {"special", true}};
  }
  write_file_atomic(config_file, config.dump(2) + "\n");
  write_file_atomic(dir / "chat_template.jinja", chat.template_source);
  // generate (ours and transformers') stops at the end of a turn as well as the end of text.
  const std::string end_of_turn = end_of_turn_token(ChatTemplate(chat.template_source, chat.template_name));
  const auto it = std::find(tokens.begin(), tokens.end(), end_of_turn);
  const fs::path generation_file = dir / "generation_config.json";
  nlohmann::json generation =
      fs::exists(generation_file) ? read_json_file(generation_file.string()) : nlohmann::json::object();
  if (!generation.is_object()) generation = nlohmann::json::object();
  nlohmann::json eos = {ids[0]};
  if (it != tokens.end() && it != tokens.begin()) eos.push_back(ids[static_cast<size_t>(it - tokens.begin())]);
  generation["bos_token_id"] = ids[0];
  generation["eos_token_id"] = eos.size() == 1 ? eos[0] : eos;
  write_file_atomic(generation_file, generation.dump(2) + "\n");
}

void save_trained_weights(GPT2& model, const fs::path& dir, const std::string& base_model) {
  if (!model->lora()) {
    save_model_folder(model, dir);
    return;
  }
  save_adapter_folder(model, *model->lora(), dir, base_model);
  write_file_atomic(dir / "config.json", model->config().to_json().dump(2) + "\n");  // the base's shape
}

void load_trained_weights(GPT2& model, const fs::path& dir) {
  if (model->lora()) load_adapter_weights(model, dir);
  else load_weights(model, dir);
}

}  // namespace gpt2ft
