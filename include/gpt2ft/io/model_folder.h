// Hugging Face model folders in and out: config.json + model.safetensors (or a sharded
// model.safetensors.index.json), plus the tokenizer files carried through.
#pragma once

#include <filesystem>
#include <functional>
#include <optional>
#include <string>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "gpt2ft/data/shard_manifest.h"
#include "gpt2ft/io/safetensors.h"
#include "gpt2ft/model/gpt2.h"

namespace gpt2ft {

// Loads config.json and the weights of `dir` into a new model on `device`. Accepts keys with
// or without the "transformer." prefix and F32/F16/BF16 storage (converted to float32).
// `adjust` may change the config before the model is built (e.g. its dropout).
GPT2 load_model_folder(const std::filesystem::path& dir, c10::Device device = c10::kCPU,
                       const std::function<void(GPT2Config&)>& adjust = {});

// Loads the weights of `dir` into an existing model (any device), checking names and shapes.
void load_weights(GPT2& model, const std::filesystem::path& dir);

struct SaveModelOptions {
  c10::ScalarType dtype = c10::kFloat;  // storage dtype of model.safetensors
  // A folder whose tokenizer files (vocab.json, merges.txt, ...) are copied alongside, or a
  // SentencePiece .model file (copied as tokenizer.model).
  std::optional<std::filesystem::path> tokenizer_from;
};

// Writes a folder transformers.GPT2LMHeadModel.from_pretrained loads. Each file is written
// to a temporary name and renamed into place.
void save_model_folder(GPT2& model, const std::filesystem::path& dir,
                       const SaveModelOptions& options = {});

// Refuses to write a model folder over one the user has: `dir` holding config.json,
// model.safetensors or a sharded index is an Error naming it and `flag`, unless `overwrite`.
void check_model_output(const std::filesystem::path& dir, bool overwrite, const std::string& flag);

// The model's parameters under their checkpoint names, in checkpoint layout (Conv1D
// weights transposed to (in, out)), tied lm_head omitted. The one place that knows the layout.
NamedTensors to_checkpoint_tensors(GPT2& model, c10::ScalarType dtype);

// One parameter (or its gradient) in checkpoint layout: Conv1D weights transposed.
torch::Tensor to_checkpoint_layout(const std::string& name, const torch::Tensor& tensor);

// What a training checkpoint keeps of the model: the whole model folder, or with LoRA only
// the adapter folder (adapter_config.json naming `base_model`, adapter_model.safetensors)
// and the base's config.json. load_trained_weights reads back the same.
void save_trained_weights(GPT2& model, const std::filesystem::path& dir, const std::string& base_model);
void load_trained_weights(GPT2& model, const std::filesystem::path& dir);

// Copies the tokenizer files of the model folder `from` (or a SentencePiece .model file, as
// tokenizer.model) into `dir`.
void copy_tokenizer_files(const std::filesystem::path& from, const std::filesystem::path& dir);

// A model trained on conversations carries its template and tokens for transformers and
// generate --chat: chat_template.jinja, and in tokenizer_config.json (merged into one already
// in `dir`) the template as chat_template and the added tokens as special tokens in
// added_tokens_decoder; generation_config.json stops at the end-of-turn token too.
void write_chat_tokenizer_files(const ShardChat& chat, const std::filesystem::path& dir);

// Names of the tokenizer files that travel with a model folder.
const std::vector<std::string>& tokenizer_file_names();

}  // namespace gpt2ft
