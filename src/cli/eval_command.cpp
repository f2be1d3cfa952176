// gpt2-finetune eval: loss and perplexity of a model folder on token shards.
#include <cstdio>
#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "gpt2ft/core/device.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/data/shard_manifest.h"
#include "gpt2ft/eval/evaluate.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/model/lora.h"

namespace gpt2ft::cli {

void add_eval_command(CLI::App& app, Runner& run) {
  struct Args {
    std::string model, adapter, data, device = "auto";
    EvalOptions options;
    bool json = false;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("eval", "Mean next-token loss and perplexity of a model on token shards");
  cmd->add_option("--model", args->model, "Hugging Face model folder")->required();
  cmd->add_option("--adapter", args->adapter, "A LoRA adapter folder (PEFT's format) to put on the model");
  cmd->add_option("--data", args->data, "Glob of token shards, e.g. 'data/val_*.bin'")->required();
  args->options.seq_len = 0;  // the model's n_positions unless given
  cmd->add_option("--seq-len", args->options.seq_len, "Tokens predicted per window (T); default: the model's n_positions")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  cmd->add_option("--batch-size", args->options.batch_size, "Windows per forward pass")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{65536}));
  cmd->add_option("--max-sequences", args->options.max_sequences, "Evaluate the first N windows only (0 = all)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--packing", args->options.packing,
                  "Document shards: \"documents\" (each document whole, attending only to itself, as training "
                  "packs them) or \"concat\"; auto = documents for document shards")
      ->check(CLI::IsMember({"auto", "documents", "concat"}))
      ->capture_default_str();
  cmd->add_option("--too-long", args->options.too_long, "A document longer than --seq-len + 1 tokens: truncate | error")
      ->check(CLI::IsMember({"truncate", "error"}))
      ->capture_default_str();
  cmd->add_option("--device", args->device, "auto | cpu | cuda | cuda:N")->capture_default_str();
  cmd->add_flag("--json", args->json, "Print one JSON object as the last line");
  cmd->callback([args, &run] {
    run = [args] {
      const auto shards = expand_glob(args->data, "--data");
      check_shards_match_model(shards, args->model, "--data");
      const c10::Device device = open_device(args->device);
      GPT2 model = load_model_folder(args->model, device);
      if (!args->adapter.empty()) attach_adapter_folder(model, args->adapter);
      if (args->options.seq_len == 0) args->options.seq_len = model->config().n_positions;
      if (const auto chat = shard_chat(shards); chat && chat->vocab_size() > model->config().vocab_size) {
        throw Error("--data: the shards' chat template (" + chat->template_name + ") added the tokens " +
                    nlohmann::json(chat->added_tokens).dump() + " after the vocabulary, which " + args->model +
                    " (" + std::to_string(model->config().vocab_size) + " rows) does not have; evaluate the model "
                    "trained on them (its final/ folder, or the base with --adapter)");
      }
      const EvalResult r = evaluate(model, shards, args->options, device);
      if (args->json) {
        std::cout << nlohmann::json{{"loss", r.loss},
                                    {"tokens", r.tokens},
                                    {"target_tokens", r.tokens},
                                    {"sequences", r.sequences},
                                    {"perplexity", r.perplexity}}
                         .dump()
                  << std::endl;
      } else {
        std::printf("loss %.6f over %lld target tokens (%lld sequences, %lld batches), perplexity %.4f\n", r.loss,
                    static_cast<long long>(r.tokens), static_cast<long long>(r.sequences),
                    static_cast<long long>(r.batches), r.perplexity);
      }
      return kExitOk;
    };
  });
}

}  // namespace gpt2ft::cli
