// Shard manifests and the tokenizer check.
#include "gpt2ft/data/shard_manifest.h"

#include <nlohmann/json.hpp>

#include "gpt2ft/core/error.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/tokenizer/byte_level_bpe.h"
#include "gpt2ft/tokenizer/tokenizer.h"

namespace gpt2ft {
namespace fs = std::filesystem;

std::optional<ShardTokenizer> shard_tokenizer(const std::vector<fs::path>& shards) {
  if (shards.empty()) return std::nullopt;
  const fs::path manifest = shards.front().parent_path() / "manifest.json";
  if (!fs::exists(manifest)) return std::nullopt;
  const nlohmann::json j = read_json_file(manifest.string());
  const auto& t = j.contains("tokenizer") ? j["tokenizer"] : nlohmann::json();
  if (!t.is_object() || !t.contains("identity") || !t["identity"].is_string()) {
    throw Error(manifest.string() + ": expected a \"tokenizer\" object with an \"identity\" string (as `gpt2-finetune "
                                    "tokenize` writes it); the manifest is damaged. Re-run tokenize, or move the "
                                    "manifest away to train without the tokenizer check");
  }
  ShardTokenizer out;
  out.identity = t["identity"].get<std::string>();
  // The identity is "kind:hash": a kind that disagrees with it is not a claim to believe.
  if (t.contains("kind") && (!t["kind"].is_string() || out.identity.rfind(t["kind"].get<std::string>() + ":", 0) != 0)) {
    throw Error(manifest.string() + ": tokenizer.kind " + t["kind"].dump() + " disagrees with tokenizer.identity \"" +
                out.identity + "\"; the manifest is damaged. Re-run tokenize, or move the manifest away to train "
                "without the tokenizer check");
  }
  if (t.contains("source") && t["source"].is_string()) out.source = t["source"].get<std::string>();
  out.manifest = manifest;
  return out;
}

std::optional<ShardChat> shard_chat(const std::vector<fs::path>& shards) {
  if (shards.empty()) return std::nullopt;
  const fs::path manifest = shards.front().parent_path() / "manifest.json";
  if (!fs::exists(manifest)) return std::nullopt;
  const nlohmann::json j = read_json_file(manifest.string());
  if (!j.is_object() || !j.contains("chat")) return std::nullopt;
  try {
    ShardChat c;
    c.template_name = j.at("chat").at("template").get<std::string>();
    c.template_source = j.at("chat").at("template_source").get<std::string>();
    c.added_tokens = j.at("tokenizer").at("added_tokens").get<std::vector<std::string>>();
    c.base_vocab_size = j.at("tokenizer").at("base_vocab_size").get<int64_t>();
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw Error(manifest.string() + ": a chat manifest without the fields tokenize writes (" + e.what() +
                "); the manifest is damaged. Re-run tokenize");
  }
}

int64_t vocab_for_data(const std::optional<ShardChat>& chat, int64_t model_vocab, int64_t resize_vocab) {
  const int64_t needed = chat ? chat->vocab_size() : 0;
  if (resize_vocab > 0) {
    if (resize_vocab < needed) {
      throw Error("model.resize_vocab is " + std::to_string(resize_vocab) + " but the shards of data.train use " +
                  std::to_string(needed) + " ids (their chat template's tokens); set it to at least " +
                  std::to_string(needed) + ", or to 0 to size it from the data");
    }
    return resize_vocab;
  }
  return needed > model_vocab ? (needed + 63) / 64 * 64 : model_vocab;
}

void check_added_tokens_match(const ShardChat& chat, const fs::path& model_dir, const std::string& what) {
  if (!fs::is_directory(model_dir) || !folder_has_tokenizer(model_dir)) return;
  const auto tokenizer = load_tokenizer(model_dir);
  const auto* bpe = dynamic_cast<const ByteLevelBpe*>(tokenizer.get());
  if (!bpe || bpe->added_tokens().empty()) return;
  if (bpe->added_tokens() != chat.added_tokens || bpe->base_vocab_size() != chat.base_vocab_size) {
    const auto list = [](const std::vector<std::string>& v) { return nlohmann::json(v).dump(); };
    throw Error(what + ": the shards' template added the tokens " + list(chat.added_tokens) + " from id " +
                std::to_string(chat.base_vocab_size) + ", but the model " + model_dir.string() + " has " +
                list(bpe->added_tokens()) + " from id " + std::to_string(bpe->base_vocab_size()) +
                "; tokenize with the model's own folder as --tokenizer");
  }
}

fs::path model_tokenizer_folder(const fs::path& model_dir) {
  fs::path dir = model_dir;
  for (int depth = 0; depth < 16; ++depth) {  // a chain of runs, each started from the last one's checkpoint
    if (!fs::is_directory(dir) || folder_has_tokenizer(dir) || !fs::is_regular_file(dir / "trainer_state.json")) break;
    const nlohmann::json state = read_json_file((dir / "trainer_state.json").string());
    const nlohmann::json* from = state.is_object() && state.contains("config") && state["config"].is_object() &&
                                         state["config"].contains("model") && state["config"]["model"].is_object()
                                     ? &state["config"]["model"]
                                     : nullptr;
    if (from == nullptr || !from->contains("init_from") || !(*from)["init_from"].is_string() ||
        (*from)["init_from"].get<std::string>().empty()) {
      break;
    }
    dir = (*from)["init_from"].get<std::string>();
  }
  return dir;
}

std::optional<std::string> model_tokenizer_identity(const fs::path& model_dir) {
  if (!fs::is_directory(model_dir) || !folder_has_tokenizer(model_dir)) return std::nullopt;
  return load_tokenizer(model_dir)->identity();
}

void check_shards_match_model(const std::vector<fs::path>& shards, const fs::path& model_dir, const std::string& what) {
  check_shards_match_model(shards, model_dir, model_tokenizer_identity(model_dir), what);
}

void check_shards_match_model(const std::vector<fs::path>& shards, const fs::path& model_dir,
                              const std::optional<std::string>& model, const std::string& what) {
  const std::optional<ShardTokenizer> made_by = shard_tokenizer(shards);
  if (!made_by || !model || *model == made_by->identity) return;
  throw Error(what + ": the shards were made with tokenizer " + made_by->identity + " (" +
              (made_by->source.empty() ? "?" : made_by->source) + ", per " + made_by->manifest.string() +
              ") but the model " + model_dir.string() + " has tokenizer " + *model +
              "; its ids mean other tokens. Tokenize the text with the model's tokenizer (gpt2-finetune tokenize "
              "--tokenizer " + model_dir.string() + ")");
}

}  // namespace gpt2ft
