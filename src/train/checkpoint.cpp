// Crash-safe training checkpoints.
#include "gpt2ft/train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include <algorithm>
#include <cmath>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/checksum.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/fault_injection.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/core/rng_state.h"
#include "gpt2ft/core/strings.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/io/safetensors.h"

namespace gpt2ft {
namespace fs = std::filesystem;
namespace {

// 2: trainer_state.json carries a checksum of every other file. 1 (no checksums) still loads.
constexpr int kFormatVersion = 2;
constexpr int64_t kMaxSteps = 1ll << 40;

std::string step_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step_%08lld", static_cast<long long>(step));
  return name;
}

std::vector<c10::Device> rng_devices(GPT2& model) {
  std::vector<c10::Device> devices = {c10::kCPU};
  const auto d = model->transformer->wte->weight.device();
  if (d.is_cuda()) devices.push_back(d);
  return devices;
}

}  // namespace

fs::path checkpoint_folder(const fs::path& run_dir, int64_t step) { return run_dir / "checkpoints" / step_name(step); }

std::string rng_key_of_rank(int rank, const std::string& device_type) {
  return rank == 0 ? "rng." + device_type : "rng.rank" + std::to_string(rank) + "." + device_type;
}

namespace {

void fsync_tree(const fs::path& dir) {
  for (const auto& entry : fs::directory_iterator(dir)) {
    const int fd = ::open(entry.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
  }
  fsync_directory(dir);
}

// "step_" and 8 digits: the folders checkpoint_folder() names.
bool is_checkpoint_name(const std::string& n) {
  return n.size() >= 13 && n.rfind("step_", 0) == 0 && n.find_first_not_of("0123456789", 5) == std::string::npos;
}

nlohmann::json read_json(const fs::path& path) {
  try {
    return parse_json_limited(read_text_file(path), path.string());
  } catch (const nlohmann::json::exception& e) {
    throw Error(path.string() + ": not valid JSON (" + e.what() + "); the checkpoint is damaged");
  }
}

template <class T>
T get_field(const nlohmann::json& j, const char* key, const fs::path& file) {
  if (!j.contains(key)) throw Error(file.string() + ": missing \"" + key + "\"; the checkpoint is damaged");
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    throw Error(file.string() + ": \"" + key + "\" has the wrong type; the checkpoint is damaged");
  }
}


}  // namespace

TrainingState parse_training_state(const nlohmann::json& meta, const fs::path& file) {
  if (!meta.is_object()) throw Error(file.string() + ": expected a JSON object; the checkpoint is damaged");
  auto integer = [&](const char* key, int64_t lo, int64_t hi) {
    auto damaged = [&] {
      return Error(file.string() + ": \"" + key + "\" is " + meta.at(key).dump() + ", expected an integer in [" +
                   std::to_string(lo) + ", " + std::to_string(hi) + "]; the checkpoint is damaged");
    };
    if (!meta.contains(key)) throw Error(file.string() + ": missing \"" + key + "\"; the checkpoint is damaged");
    // The type first: converting a float such as 1e51 to an integer is undefined behaviour.
    if (!meta.at(key).is_number_integer()) throw damaged();
    const int64_t v = meta.at(key).get<int64_t>();  // an unsigned above INT64_MAX wraps negative: refused below
    if (v < lo || v > hi) throw damaged();
    return v;
  };
  const int64_t version = integer("format_version", 1, kFormatVersion);
  TrainingState s;
  s.step = integer("step", 0, kMaxSteps);  // 0: out of memory in the first step, with checkpoint_and_exit
  s.loader.epoch = integer("loader_epoch", 0, 1ll << 30);
  s.loader.consumed = integer("loader_consumed", 0, 1ll << 32);
  s.global_batch = integer("global_batch", 1, 1ll << 24);
  s.micro_batch = integer("micro_batch", 1, s.global_batch);
  s.micro_batch_from_oom = get_field<bool>(meta, "micro_batch_from_oom", file);
  s.world_size = integer("world_size", 1, s.global_batch);
  if (meta.contains("best_val_loss")) {  // absent in older checkpoints and before the first validation
    if (!meta["best_val_loss"].is_number() || !std::isfinite(meta["best_val_loss"].get<double>())) {
      throw Error(file.string() + ": \"best_val_loss\" must be a finite number; the checkpoint is damaged");
    }
    s.best_val_loss = meta["best_val_loss"].get<double>();
    s.best_step = integer("best_step", 0, s.step);
  }
  if (meta.contains("evals_without_improvement")) {
    s.evals_without_improvement = integer("evals_without_improvement", 0, 1ll << 40);
  }
  if (!meta.contains("config") || !meta["config"].is_object()) {
    throw Error(file.string() + ": missing \"config\" (the run's config); the checkpoint is damaged");
  }
  if (version >= 2 && (!meta.contains("checksums") || !meta["checksums"].is_object() || meta["checksums"].empty())) {
    throw Error(file.string() + ": missing \"checksums\"; the checkpoint is damaged");
  }
  if (meta.contains("fingerprint")) {
    const auto& f = meta["fingerprint"];
    if (!f.is_object() || std::any_of(f.begin(), f.end(), [](const nlohmann::json& v) { return !v.is_string(); })) {
      throw Error(file.string() + ": \"fingerprint\" must be an object of strings; the checkpoint is damaged");
    }
    s.fingerprint = f;
  }
  return s;
}

namespace {

// Every file trainer_state.json lists has the checksum it was written with.
void verify_checksums(const nlohmann::json& meta, const fs::path& dir) {
  if (!meta.contains("checksums")) {
    spdlog::warn("{}: written by an older gpt2-finetune, without checksums: its files are not verified", dir.string());
    return;
  }
  for (const auto& [name, expected] : meta["checksums"].items()) {
    const fs::path file = dir / name;
    if (!expected.is_string() || name.find('/') != std::string::npos) {
      throw Error((dir / "trainer_state.json").string() + ": checksums." + name + " is not a file's checksum");
    }
    if (!fs::exists(file)) throw Error(file.string() + ": missing (listed in trainer_state.json); the checkpoint is damaged");
    const std::string found = file_checksum(file);
    if (found != expected.get<std::string>()) {
      throw Error(file.string() + ": checksum " + found + " but " + expected.get<std::string>() +
                  " was written; the file is damaged. Resume from an earlier checkpoint (checkpoint.resume) or start "
                  "over in another output_dir");
    }
  }
  // Every file the checkpoint is read from is covered: an entry taken out must not turn the check off.
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if ((ends_with(name, ".safetensors") || name == "config.json") && !meta["checksums"].contains(name)) {
      throw Error((dir / "trainer_state.json").string() + ": no checksum for " + name +
                  "; the checkpoint is damaged. Resume from an earlier one");
    }
  }
}

}  // namespace

fs::path save_checkpoint(const fs::path& run_dir, const TrainingState& state, GPT2& model,
                         const NamedTensors& optimizer_state, const GradScaler* scaler, const TrainConfig& config,
                         int64_t keep_last, const NamedTensors& rank_rng) {
  const fs::path root = run_dir / "checkpoints";
  fs::create_directories(root);
  const std::string name = step_name(state.step);
  const fs::path final_dir = root / name;
  const fs::path temp = root / (".tmp-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(temp);
  fs::create_directories(temp);

  save_trained_weights(model, temp, config.model.init_from.empty() ? "" : fs::absolute(config.model.init_from).string());
  checkpoint_kill_point();
  NamedTensors tensors = optimizer_state;
  if (scaler) {
    tensors.emplace_back("scaler.scale", scaler->scale_tensor());
    tensors.emplace_back("scaler.growth_tracker", scaler->growth_tracker());
    tensors.emplace_back("scaler.skipped_steps", scaler->skipped_steps());
  }
  for (const auto& d : rng_devices(model)) tensors.emplace_back(rng_key_of_rank(0, d.is_cpu() ? "cpu" : "cuda"), get_rng_state(d));
  for (const auto& item : rank_rng) tensors.push_back(item);
  save_safetensors(temp / "trainer_state.safetensors", tensors);
  checkpoint_kill_point();
  nlohmann::json meta = {{"format_version", kFormatVersion},
                               {"step", state.step},
                               {"loader_epoch", state.loader.epoch},
                               {"loader_consumed", state.loader.consumed},
                               {"micro_batch", state.micro_batch},
                               {"global_batch", state.global_batch},
                               {"micro_batch_from_oom", state.micro_batch_from_oom},
                               {"world_size", state.world_size},
                               {"scaler", scaler != nullptr},
                               {"config", config.to_json()}};
  if (!state.fingerprint.is_null()) meta["fingerprint"] = state.fingerprint;
  if (state.best_val_loss) {
    meta["best_val_loss"] = *state.best_val_loss;
    meta["best_step"] = state.best_step;
  }
  meta["evals_without_improvement"] = state.evals_without_improvement;
  nlohmann::json checksums = nlohmann::json::object();
  for (const auto& entry : fs::directory_iterator(temp)) {
    checksums[entry.path().filename().string()] = file_checksum(entry.path());
  }
  meta["checksums"] = checksums;
  write_file_atomic(temp / "trainer_state.json", meta.dump(2) + "\n");
  fsync_tree(temp);
  checkpoint_kill_point();

  if (fs::exists(final_dir)) fs::remove_all(final_dir);  // a checkpoint of the same step from an earlier attempt
  fs::rename(temp, final_dir);
  fsync_directory(root);
  checkpoint_kill_point();
  write_file_atomic(root / "latest", name + "\n");
  checkpoint_kill_point();

  // Prune: keep the newest keep_last complete checkpoints; drop stale temporaries. Only names
  // this function writes are touched (step_NNNNNNNN, .tmp-step_NNNNNNNN-PID): a user's
  // step_00000001_backup/ or .tmp-notes.txt stays.
  std::vector<fs::path> complete;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string n = entry.path().filename().string();
    if (!entry.is_directory()) continue;
    if (is_checkpoint_name(n)) {
      complete.push_back(entry.path());
    } else if (n.rfind(".tmp-", 0) == 0 && entry.path() != temp) {
      const std::string rest = n.substr(5);
      const size_t dash = rest.rfind('-');
      if (dash != std::string::npos && is_checkpoint_name(rest.substr(0, dash)) && dash + 1 < rest.size() &&
          rest.find_first_not_of("0123456789", dash + 1) == std::string::npos) {
        fs::remove_all(entry.path());
      }
    }
  }
  std::sort(complete.begin(), complete.end());
  for (size_t i = 0; i + static_cast<size_t>(keep_last) < complete.size(); ++i) {
    if (complete[i] != final_dir) fs::remove_all(complete[i]);
  }
  spdlog::info("checkpoint saved: {}", final_dir.string());
  return final_dir;
}

std::optional<fs::path> latest_checkpoint(const fs::path& run_dir) {
  const fs::path pointer = run_dir / "checkpoints" / "latest";
  if (!fs::exists(pointer)) return std::nullopt;
  std::string name = read_text_file(pointer);
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  const fs::path dir = run_dir / "checkpoints" / name;
  if (name.empty() || name.find('/') != std::string::npos || !fs::is_directory(dir)) {
    throw Error(pointer.string() + ": names \"" + name + "\", which is not a checkpoint folder; the run folder was "
                                   "altered. Point checkpoint.resume at a checkpoint folder, or set it to \"none\"");
  }
  return dir;
}

TrainingState read_checkpoint_state(const fs::path& dir) {
  return with_context("reading checkpoint " + dir.string(), [&] {
    if (!fs::is_directory(dir)) throw Error(dir.string() + ": not a checkpoint folder");
    const fs::path meta_path = dir / "trainer_state.json";
    TrainingState s = parse_training_state(read_json(meta_path), meta_path);
    s.source = dir;
    return s;
  });
}

namespace {

// Every optimizer step count must be a whole number of steps in [1, the checkpoint's step]
// (from 0 under float16, whose loss scaler skips steps, and in a checkpoint of step 0, written
// when the first step ran out of memory): a count of 0, a fraction or more
// steps than were taken would change the bias correction of every later update.
void check_step_counts(const Optimizer& optimizer, int64_t checkpoint_step, bool steps_skipped, const fs::path& file) {
  const int64_t least = steps_skipped || checkpoint_step == 0 ? 0 : 1;
  for (const auto& [name, t] : optimizer.checkpoint_state()) {
    if (name.find(".step.") == std::string::npos || t.numel() != 1) continue;
    const double v = t.to(torch::kCPU).to(torch::kDouble).item<double>();
    if (!(v >= static_cast<double>(least) && v <= static_cast<double>(checkpoint_step) && v == std::floor(v))) {
      throw Error(file.string() + ": \"" + name + "\" is " + fmt::format("{:g}", v) + ", expected a whole number of "
                  "steps from " + std::to_string(least) + " to the checkpoint's step " + std::to_string(checkpoint_step) +
                  "; the checkpoint is damaged. Resume from an earlier one");
    }
  }
}

}  // namespace

TrainingState load_checkpoint(const fs::path& dir, GPT2& model, Optimizer& optimizer, GradScaler* scaler, int rank,
                              int world_size) {
  return with_context("resuming from checkpoint " + dir.string(), [&] {
    if (!fs::is_directory(dir)) throw Error(dir.string() + ": not a checkpoint folder");
    const fs::path meta_path = dir / "trainer_state.json";
    const nlohmann::json meta = read_json(meta_path);
    TrainingState s = parse_training_state(meta, meta_path);
    s.source = dir;
    verify_checksums(meta, dir);

    // The model must have the shape the current config builds.
    const GPT2Config saved = GPT2Config::from_file(dir / "config.json");
    const GPT2Config& now = model->config();
    if (saved.n_layer != now.n_layer || saved.n_head != now.n_head || saved.n_embd != now.n_embd ||
        saved.vocab_size != now.vocab_size || saved.n_positions != now.n_positions ||
        saved.inner_dim() != now.inner_dim() || saved.tie_word_embeddings != now.tie_word_embeddings) {
      throw Error(dir.string() + " holds a model with " + std::to_string(saved.n_layer) + " layers, " +
                  std::to_string(saved.n_head) + " heads, " + std::to_string(saved.n_embd) + " channels and vocab " +
                  std::to_string(saved.vocab_size) + ", but the config builds " + std::to_string(now.n_layer) + ", " +
                  std::to_string(now.n_head) + ", " + std::to_string(now.n_embd) + " and " +
                  std::to_string(now.vocab_size) + "; use the run's own config, or another output_dir for a new run");
    }
    load_trained_weights(model, dir);

    SafetensorsReader state(dir / "trainer_state.safetensors");
    optimizer.restore_state(state);
    // Steps a loss scale skipped (then or now) leave a tensor's count below the run's.
    check_step_counts(optimizer, s.step, scaler != nullptr || meta.value("scaler", false), state.path());
    if (scaler && !state.contains("scaler.scale")) {  // amp.dtype changed to float16 (a memory lever)
      spdlog::info("{} was written without a loss scale (amp.dtype was not float16): float16's loss scale starts at "
                   "amp.init_scale", dir.string());
    } else if (scaler) {
      torch::Tensor scale = scaler->scale_tensor().clone(), tracker = scaler->growth_tracker().clone(),
                    skipped = scaler->skipped_steps().clone();
      state.load_into("scaler.scale", scale);
      state.load_into("scaler.growth_tracker", tracker);
      state.load_into("scaler.skipped_steps", skipped);
      scaler->load_state(scale, tracker, skipped);
    }
    const bool same_ranks = s.world_size == world_size;
    for (const auto& d : rng_devices(model)) {
      const std::string key = rng_key_of_rank(rank, d.is_cpu() ? "cpu" : "cuda");
      if (!state.contains(key) || (rank > 0 && !same_ranks)) {  // e.g. a CPU checkpoint resumed on CUDA
        if (rank > 0) s.rng_restored = false;
        continue;
      }
      try {
        set_rng_state(d, state.load(key));
      } catch (const c10::Error&) {  // its own text names no file ("Invalid mt19937 state", ...)
        throw Error(state.path().string() + ": the random number generator state \"" + key +
                    "\" is damaged (not a state of this generator). Resume from the checkpoint before this one "
                    "(checkpoint.resume set to its folder)");
      }
    }
    return s;
  });
}

}  // namespace gpt2ft
