// gpt2-finetune: the command line. It only parses arguments and calls the gpt2ft library.
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/device.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/eval/evaluate.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/model/init.h"

namespace {

using namespace gpt2ft;

struct InitArgs {
  std::string preset;
  std::string config_json;
  std::string output;
  uint64_t seed = 1337;
};

struct EvalArgs {
  std::string model;
  std::string data;
  int64_t seq_len = 1024;
  int64_t batch_size = 8;
  int64_t max_batches = 0;
  std::string device = "auto";
  bool json = false;
};

void add_init_command(CLI::App& app, InitArgs& args) {
  CLI::App* cmd = app.add_subcommand("init", "Write a randomly initialised model folder (HF format)");
  auto* preset = cmd->add_option("--preset", args.preset, "gpt2 | gpt2-medium | gpt2-large | gpt2-xl | distilgpt2");
  auto* config = cmd->add_option("--config-json", args.config_json, "A Hugging Face config.json describing the shape");
  preset->excludes(config);
  cmd->add_option("--output", args.output, "Folder to write (created if missing)")->required();
  cmd->add_option("--seed", args.seed, "Initialisation seed")->capture_default_str();
  cmd->callback([&] {
    if (args.preset.empty() && args.config_json.empty()) {
      throw CLI::RequiredError("init needs --preset NAME or --config-json FILE");
    }
  });
}

void add_eval_command(CLI::App& app, EvalArgs& args) {
  CLI::App* cmd = app.add_subcommand("eval", "Mean next-token loss and perplexity of a model on token shards");
  cmd->add_option("--model", args.model, "Hugging Face model folder")->required();
  cmd->add_option("--data", args.data, "Glob of token shards, e.g. 'data/val_*.bin'")->required();
  cmd->add_option("--seq-len", args.seq_len, "Tokens predicted per window (T)")->capture_default_str();
  cmd->add_option("--batch-size", args.batch_size, "Windows per forward pass")->capture_default_str();
  cmd->add_option("--max-batches", args.max_batches, "Stop after N batches (0 = all)")->capture_default_str();
  cmd->add_option("--device", args.device, "auto | cpu | cuda | cuda:N")->capture_default_str();
  cmd->add_flag("--json", args.json, "Print one JSON object as the last line");
}

int run_init(const InitArgs& args) {
  GPT2Config config = args.preset.empty() ? GPT2Config::from_file(args.config_json)
                                          : GPT2Config::preset(args.preset);
  GPT2 model(config);
  init_gpt2_weights(model, args.seed);
  save_model_folder(model, args.output);
  spdlog::info("wrote a {}-parameter model ({} layers, {} heads, {} channels) to {}",
               config.num_parameters(), config.n_layer, config.n_head, config.n_embd, args.output);
  return kExitOk;
}

int run_eval(const EvalArgs& args) {
  const c10::Device device = parse_device(args.device);
  GPT2 model = load_model_folder(args.model, device);
  const auto shards = expand_glob(args.data, "--data");
  EvalOptions options;
  options.seq_len = args.seq_len;
  options.batch_size = args.batch_size;
  options.max_batches = args.max_batches;
  const EvalResult r = evaluate(model, shards, options, device);
  if (args.json) {
    std::cout << nlohmann::json{{"loss", r.loss}, {"tokens", r.tokens}, {"perplexity", r.perplexity}}.dump()
              << std::endl;
  } else {
    std::printf("loss %.6f over %lld tokens (%lld batches), perplexity %.4f\n", r.loss,
                static_cast<long long>(r.tokens), static_cast<long long>(r.batches), r.perplexity);
  }
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  spdlog::set_pattern("[%H:%M:%S] %^%l%$ %v");
  CLI::App app{"gpt2-finetune: fine-tune GPT-2 models on your own text"};
  app.set_version_flag("--version", std::string("gpt2-finetune ") + GPT2FT_VERSION + " (libtorch " +
                                        TORCH_VERSION + ")");
  app.require_subcommand(1);
  InitArgs init_args;
  EvalArgs eval_args;
  add_init_command(app, init_args);
  add_eval_command(app, eval_args);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }

  try {
    if (app.got_subcommand("init")) return run_init(init_args);
    if (app.got_subcommand("eval")) return run_eval(eval_args);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpt2-finetune: error: %s\n", describe_exception(e).c_str());
    return kExitError;
  }
  return kExitUsage;
}
