// Run fingerprints.
#include "gpt2ft/train/run_fingerprint.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <tuple>
#include <utility>

#include "gpt2ft/core/checksum.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/data/shard_manifest.h"
#include "gpt2ft/tokenizer/tokenizer.h"

namespace gpt2ft {
namespace fs = std::filesystem;

namespace {

std::string absolute(const std::string& path) { return path.empty() ? "" : fs::absolute(path).lexically_normal().string(); }

// The identity of the weights (and config) in a model or adapter folder: every .safetensors
// and .json file's sampled checksum, by name.
std::string folder_identity(const std::string& dir) {
  if (dir.empty() || !fs::is_directory(dir)) return "";
  std::vector<std::string> parts;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    const std::string ext = entry.path().extension().string();
    if (entry.is_regular_file() && (ext == ".safetensors" || name == "config.json" || name == "adapter_config.json" ||
                                    name == "model.safetensors.index.json")) {
      parts.push_back(name + "=" + file_sample_checksum(entry.path()));
    }
  }
  std::sort(parts.begin(), parts.end());
  std::string all;
  for (const auto& p : parts) all += p + ";";
  return hex64(fnv1a64(all));
}

// The shards' identity (names, sizes, sampled contents) and the tokenizer their manifest
// records, from one listing of the glob.
std::pair<std::string, std::string> shards_and_tokenizer(const std::string& pattern, const std::string& what) {
  std::vector<fs::path> shards;
  try {
    shards = expand_glob(pattern, what);
  } catch (const std::exception&) {
    return {"(no shards)", ""};  // the loader reports this itself, with its own message
  }
  std::string all;
  uintmax_t bytes = 0;
  for (const auto& s : shards) {
    bytes += fs::file_size(s);
    // 64 KiB at each end: with thousands of shards a start must not read gigabytes.
    all += s.filename().string() + "=" + file_sample_checksum(s, size_t{64} << 10) + ";";
  }
  std::string tokenizer;
  try {
    if (const auto t = shard_tokenizer(shards)) tokenizer = t->identity;
  } catch (const std::exception&) {
    // a damaged manifest is reported by the tokenizer check, where one applies
  }
  return {fmt::format("{} shard(s), {} bytes, id {}", shards.size(), bytes, hex64(fnv1a64(all))), tokenizer};
}

std::string number(double v) { return fmt::format("{:g}", v); }

}  // namespace

std::string shards_identity(const std::string& pattern, const std::string& what) {
  return shards_and_tokenizer(pattern, what).first;
}

nlohmann::json run_fingerprint(const TrainConfig& c) {
  nlohmann::json f = nlohmann::json::object();
  if (!c.model.init_from.empty()) {
    f["model.init_from"] = absolute(c.model.init_from);
    f["model weights"] = folder_identity(c.model.init_from);
    const auto tokenizer = model_tokenizer_identity(model_tokenizer_folder(c.model.init_from));
    f["model tokenizer"] = tokenizer.value_or("");
  } else {
    f["model.preset"] = c.model.preset;
    f["model weights"] = "random, train.seed " + std::to_string(c.train.seed);
  }
  f["model.dropout"] = number(c.model.dropout);
  f["model.resize_vocab"] = std::to_string(c.model.resize_vocab);
  f["model.freeze_embeddings"] = c.model.freeze_embeddings ? "true" : "false";
  f["model.freeze_blocks"] = std::to_string(c.model.freeze_blocks);
  if (c.lora()) {
    const LoraConfig lora = c.lora_config();
    f["model.lora"] = fmt::format("r {}, alpha {}, dropout {}, targets {}, base {}", lora.rank, number(lora.alpha),
                                  number(lora.dropout), nlohmann::json(lora.targets).dump(), c.model.lora.base_dtype);
    if (!c.model.lora.init_from.empty()) {
      f["model.lora.init_from"] = absolute(c.model.lora.init_from);
      f["adapter weights"] = folder_identity(c.model.lora.init_from);
    }
  } else {
    f["model.lora"] = "off";
  }
  f["data.train"] = absolute(c.data.train);
  std::tie(f["data.train shards"], f["data.train tokenizer"]) = shards_and_tokenizer(c.data.train, "data.train");
  f["data.seq_len"] = std::to_string(c.data.seq_len);
  f["data.shuffle"] = c.data.shuffle ? "true" : "false";
  f["data.packing"] = c.data.packing;  // "auto" resolves by the shards, which are in the fingerprint
  f["data.too_long"] = c.data.too_long;
  f["data.seed"] = std::to_string(c.data.seed);
  f["train.lr"] = fmt::format("{} to {}, {}, warmup {}", number(c.train.lr), number(c.train.min_lr), c.train.lr_schedule,
                              c.train.warmup_steps);
  f["train AdamW"] = fmt::format("betas [{}, {}], eps {}, weight_decay {}", number(c.train.betas[0]),
                                 number(c.train.betas[1]), number(c.train.eps), number(c.train.weight_decay));
  f["train.grad_clip"] = number(c.train.grad_clip);
  f["train.optimizer"] = c.train.optimizer;
  f["train.adamw_8bit.embeddings"] = c.train.adamw_8bit_embeddings;
  f["train.seed"] = std::to_string(c.train.seed);
  if (c.preference_training()) {  // only then, so that earlier runs' fingerprints still match
    f["train.objective"] = c.train.objective;
    f["dpo"] = fmt::format("{}, beta {}, label_smoothing {}, reference {}", c.dpo.loss, number(c.dpo.beta),
                           number(c.dpo.label_smoothing), c.dpo.reference);
  }
  f["amp.dtype"] = c.amp.dtype;
  return f;
}

std::vector<std::string> fingerprint_differences(const nlohmann::json& saved, const nlohmann::json& now) {
  std::vector<std::string> out;
  const auto text = [](const nlohmann::json& v) {
    const std::string s = v.is_string() ? v.get<std::string>() : v.dump();
    return s.empty() ? std::string("(none)") : "\"" + s + "\"";
  };
  if (!saved.is_object() || saved.empty()) {  // damaged: nothing to compare would turn the check off
    out.push_back("the run fingerprint: expected an object of " + std::to_string(now.size()) + " fields, found " +
                  (saved.is_object() ? std::string("an empty one") : text(saved)));
    return out;
  }
  for (const auto& [key, value] : now.items()) {
    if (!saved.contains(key)) {
      out.push_back(key + ": not recorded in the checkpoint's fingerprint, now " + text(value));
    } else if (saved[key] != value) {
      out.push_back(key + ": was " + text(saved[key]) + ", now " + text(value));
    }
  }
  return out;
}

FingerprintChanges classify_fingerprint_changes(const nlohmann::json& saved, const nlohmann::json& now) {
  FingerprintChanges out;
  if (!saved.is_object() || saved.empty()) {
    out.other = fingerprint_differences(saved, now);
    return out;
  }
  const auto text = [](const nlohmann::json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); };
  const auto number = [&](const nlohmann::json& v) -> std::optional<int64_t> {
    try {
      return std::stoll(text(v));
    } catch (const std::exception&) {
      return std::nullopt;
    }
  };
  nlohmann::json rest_saved = saved, rest_now = now;
  const auto take = [&](const std::string& key, const std::string& line) {
    out.resumable.push_back(line);
    rest_saved.erase(key);
    rest_now.erase(key);
  };
  const auto changed = [&](const std::string& key) {
    return saved.contains(key) && now.contains(key) && saved[key] != now[key];
  };
  if (changed("amp.dtype")) {
    take("amp.dtype", "amp.dtype \"" + text(saved["amp.dtype"]) + "\" -> \"" + text(now["amp.dtype"]) +
                          "\": autocast computes in the new dtype" +
                          (text(now["amp.dtype"]) == "float16" ? " (float16's loss scale starts afresh)" : ""));
  }
  if (changed("train.optimizer")) {
    const std::string to = text(now["train.optimizer"]);
    take("train.optimizer", "train.optimizer \"" + text(saved["train.optimizer"]) + "\" -> \"" + to + "\": " +
                                (to == "adamw_8bit" ? "the moments quantized into 8-bit blocks"
                                                    : "the moments dequantized to float32"));
  }
  if (changed("train.adamw_8bit.embeddings")) {
    take("train.adamw_8bit.embeddings", "train.adamw_8bit.embeddings \"" + text(saved["train.adamw_8bit.embeddings"]) +
                                            "\" -> \"" + text(now["train.adamw_8bit.embeddings"]) +
                                            "\": the embeddings' moments converted");
  }
  if (changed("model.freeze_blocks")) {
    const auto was = number(saved["model.freeze_blocks"]), is = number(now["model.freeze_blocks"]);
    if (was && is && *is > *was) {  // more frozen: their state dropped (fewer is another run: no state for them)
      take("model.freeze_blocks", fmt::format("model.freeze_blocks {} -> {}: blocks {}..{} stop training; their "
                                              "optimizer state is dropped, their weights kept", *was, *is, *was, *is - 1));
    }
  }
  if (changed("model.freeze_embeddings") && text(now["model.freeze_embeddings"]) == "true") {
    take("model.freeze_embeddings", "model.freeze_embeddings false -> true: the embeddings stop training; their "
                                    "optimizer state is dropped, their weights kept");
  }
  out.other = fingerprint_differences(rest_saved, rest_now);
  return out;
}

}  // namespace gpt2ft
