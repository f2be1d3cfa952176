// What manifest.json (written by `gpt2-finetune tokenize` beside the shards) says about the
// tokenizer that made the shards, and the check that it is the model's.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace gpt2ft {

struct ShardTokenizer {
  std::string identity;  // "kind:hash" (Tokenizer::identity)
  std::string source;    // the tokenizer's path when the shards were made
  std::filesystem::path manifest;
};

// The tokenizer recorded in the manifest.json beside `shards` (the first shard's folder), or
// nothing when there is no manifest. A manifest that is not valid JSON, or whose tokenizer
// entry is malformed, is an Error naming the file.
std::optional<ShardTokenizer> shard_tokenizer(const std::vector<std::filesystem::path>& shards);

// What manifest.json says of conversation shards (tokenize --chat-template): the template and
// the control tokens it added after the tokenizer's vocabulary.
struct ShardChat {
  std::string template_name;    // "chatml", "plain" or the file given
  std::string template_source;  // its text, with its {% generation %} tags
  std::vector<std::string> added_tokens;
  int64_t base_vocab_size = 0;  // the first added token's id
  int64_t vocab_size() const { return base_vocab_size + static_cast<int64_t>(added_tokens.size()); }
};

// The chat entry of the manifest beside `shards`; nothing for other shards or none.
std::optional<ShardChat> shard_chat(const std::vector<std::filesystem::path>& shards);

// The vocabulary a model of `model_vocab` rows trains with: `resize_vocab` when set (an Error
// if the chat shards use more ids), or, when the shards' chat template added tokens the model
// lacks, their count rounded up to a multiple of 64 (llm.c's 50304 for GPT-2's 50257 + 2).
int64_t vocab_for_data(const std::optional<ShardChat>& chat, int64_t model_vocab, int64_t resize_vocab);

// Refuses a model folder whose tokenizer adds other tokens (or the same at other ids) than
// the shards were made with. A folder that adds none is fine: training adds them.
void check_added_tokens_match(const ShardChat& chat, const std::filesystem::path& model_dir, const std::string& what);

// The folder holding a model folder's tokenizer files: the folder itself, or, for a training
// checkpoint (trainer_state.json beside weights without tokenizer files), the model.init_from
// of the run that wrote it, followed through checkpoints of checkpoints. model.init_from may
// name a checkpoint: an out-of-memory exit's advice for a new run does.
std::filesystem::path model_tokenizer_folder(const std::filesystem::path& model_dir);

// The identity of the tokenizer files in a model folder, or nothing when it has none.
std::optional<std::string> model_tokenizer_identity(const std::filesystem::path& model_dir);

// Refuses shards made by another tokenizer than the model's, when both are known: the ids
// would fit and train without a word, on the wrong vocabulary. `what` names the shards
// ("data.train", "--data").
void check_shards_match_model(const std::vector<std::filesystem::path>& shards, const std::filesystem::path& model_dir,
                              const std::string& what);
// The same with the model's tokenizer identity already read (model_tokenizer_identity), for
// several sets of shards against one model.
void check_shards_match_model(const std::vector<std::filesystem::path>& shards, const std::filesystem::path& model_dir,
                              const std::optional<std::string>& model_identity, const std::string& what);

}  // namespace gpt2ft
