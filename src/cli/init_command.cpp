// gpt2-finetune init: a randomly initialised model folder.
#include <memory>

#include <spdlog/spdlog.h>

#include "commands.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/model/init.h"
#include "gpt2ft/tokenizer/tokenizer.h"

namespace gpt2ft::cli {

void add_init_command(CLI::App& app, Runner& run) {
  struct Args {
    std::string preset, config_json, output, tokenizer;
    uint64_t seed = 1337;
    bool overwrite = false;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("init", "Write a randomly initialised model folder (Hugging Face format)");
  auto* preset = cmd->add_option("--preset", args->preset, "gpt2 | gpt2-medium | gpt2-large | gpt2-xl | distilgpt2");
  auto* config = cmd->add_option("--config-json", args->config_json, "A Hugging Face config.json giving the shape");
  preset->excludes(config);
  cmd->add_option("--output", args->output, "Folder to write (created if missing)")->required();
  cmd->add_option("--seed", args->seed, "Initialisation seed")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_flag("--overwrite", args->overwrite, "Replace a model already in --output");
  cmd->add_option("--tokenizer", args->tokenizer,
                  "Copy this tokenizer (a folder of tokenizer files or a SentencePiece .model) into the model folder");
  cmd->callback([args, &run] {
    if (args->preset.empty() && args->config_json.empty()) {
      throw CLI::RequiredError("init needs --preset NAME or --config-json FILE");
    }
    run = [args] {
      check_model_output(args->output, args->overwrite, "--output");
      GPT2Config config = args->preset.empty() ? GPT2Config::from_file(args->config_json)
                                               : GPT2Config::preset(args->preset);
      SaveModelOptions save;
      if (!args->tokenizer.empty()) {
        const auto tokenizer = load_tokenizer(args->tokenizer);  // validates it
        if (tokenizer->vocab_size() != config.vocab_size) {
          throw Error("--tokenizer " + args->tokenizer + " has " + std::to_string(tokenizer->vocab_size()) +
                      " tokens but the model's vocab_size is " + std::to_string(config.vocab_size));
        }
        save.tokenizer_from = args->tokenizer;
        // bos = eos = the document separator, as GPT-2's config has it; generation stops there.
        const std::optional<uint32_t> eot = tokenizer->eot_id();
        config.bos_token_id = config.eos_token_id = eot ? std::optional<int64_t>(*eot) : std::nullopt;
      } else if (config.drop_special_ids_outside_vocab()) {
        spdlog::info("bos_token_id/eos_token_id: none (the default 50256 lies outside vocab_size {}); init with "
                     "--tokenizer to take the tokenizer's end-of-text id",
                     config.vocab_size);
      }
      GPT2 model(config);
      init_gpt2_weights(model, args->seed);
      save_model_folder(model, args->output, save);
      spdlog::info("wrote a {}-parameter model ({} layers, {} heads, {} channels) to {}", config.num_parameters(),
                   config.n_layer, config.n_head, config.n_embd, args->output);
      return kExitOk;
    };
  });
}

}  // namespace gpt2ft::cli
