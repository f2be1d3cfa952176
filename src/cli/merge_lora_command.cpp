// gpt2-finetune merge-lora: a base model folder plus a LoRA adapter folder, merged into one
// Hugging Face model folder (W + scaling * B A in every adapted projection).
#include <filesystem>
#include <memory>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "commands.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/model/lora.h"

namespace gpt2ft::cli {
namespace fs = std::filesystem;

namespace {

// The adapter names the base it was trained on (PEFT's base_model_name_or_path): a --base
// elsewhere may be another model of the same shape, which merges without an error.
void warn_if_other_base(const std::string& adapter, const std::string& base) {
  const fs::path config = fs::path(adapter) / "adapter_config.json";
  if (!fs::is_regular_file(config)) return;  // attach_adapter_folder reports it
  nlohmann::json j;
  try {
    j = read_json_file(config.string());
  } catch (const std::exception&) {
    return;
  }
  if (!j.is_object() || !j.contains("base_model_name_or_path") || !j["base_model_name_or_path"].is_string()) return;
  const std::string named = j["base_model_name_or_path"].get<std::string>();
  std::error_code ec;
  if (named.empty() || fs::weakly_canonical(named, ec) == fs::weakly_canonical(base, ec)) return;
  spdlog::warn("{} was trained on base \"{}\" (adapter_config.json's base_model_name_or_path), not --base {}: the "
               "merge is right only if that is the same model", adapter, named, base);
}

}  // namespace

void add_merge_lora_command(CLI::App& app, Runner& run) {
  struct Args {
    std::string base, adapter, output, dtype = "float32";
    bool overwrite = false;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("merge-lora", "Merge a LoRA adapter into its base model (a Hugging Face folder)");
  cmd->add_option("--base", args->base, "The base model folder the adapter was trained on")->required();
  cmd->add_option("--adapter", args->adapter, "The adapter folder (adapter_config.json + adapter_model.safetensors)")
      ->required();
  cmd->add_option("--output", args->output, "Folder to write the merged model to")->required();
  cmd->add_flag("--overwrite", args->overwrite, "Replace a model already in --output");
  cmd->add_option("--dtype", args->dtype, "dtype of the saved weights")
      ->check(CLI::IsMember({"float32", "bfloat16", "float16"}))
      ->capture_default_str();
  cmd->callback([args, &run] {
    run = [args] {
      if (fs::exists(args->output) && fs::equivalent(args->output, args->base)) {
        throw Error("--output " + args->output + " is the base model folder; write the merged model elsewhere");
      }
      check_model_output(args->output, args->overwrite, "--output");
      warn_if_other_base(args->adapter, args->base);
      GPT2 model = load_model_folder(args->base);
      attach_adapter_folder(model, args->adapter);
      const size_t adapters = lora_adapters(model).size();
      merge_lora(model);
      SaveModelOptions save;
      save.dtype = args->dtype == "bfloat16" ? c10::kBFloat16 : args->dtype == "float16" ? c10::kHalf : c10::kFloat;
      save.tokenizer_from = fs::path(args->base);
      save_model_folder(model, args->output, save);
      spdlog::info("merged {} adapter(s) of {} into {} (saved to {})", adapters, args->adapter, args->base,
                   args->output);
      return kExitOk;
    };
  });
}

}  // namespace gpt2ft::cli
