// gpt2-finetune train --config run.json (also plain `gpt2-finetune --config run.json`).
#include <cstdio>
#include <memory>

#include "commands.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/train/config.h"
#include "gpt2ft/train/trainer.h"

namespace gpt2ft::cli {

namespace {
struct TrainArgs {
  std::string config;
  std::vector<std::string> overrides;
  bool print_config = false;
  bool no_final_model = false;
};

void add_train_options(CLI::App& app, TrainArgs& args) {
  app.add_option("--config", args.config, "Training config JSON (see the options below)");
  app.add_option("--set", args.overrides, "Override an option: --set train.micro_batch_size=4 (repeatable)")
      ->take_all();
  app.add_flag("--print-config", args.print_config,
               "Print the resolved config (defaults and --set applied) as JSON to stdout, and exit");
  app.add_flag("--no-final-model", args.no_final_model,
               "Save no final/ model folder at the end (a run that only measures, as plan --measure's)");
}

int run_train(const TrainArgs& args) {
  if (args.config.empty()) throw Error("train: --config FILE is required");
  const TrainConfig config = TrainConfig::from_file(args.config, args.overrides);
  if (args.print_config) {
    std::printf("%s\n", config.to_json().dump(2).c_str());
    return kExitOk;
  }
  RunEnd end;
  end.save_final_model = !args.no_final_model;
  run_training(config, end);
  return kExitOk;
}
}  // namespace

void add_train_command(CLI::App& app, Runner& run) {
  auto top = std::make_shared<TrainArgs>();
  auto sub = std::make_shared<TrainArgs>();
  add_train_options(app, *top);
  CLI::App* cmd = app.add_subcommand("train", "Fine-tune or train a model from a JSON config");
  add_train_options(*cmd, *sub);
  cmd->footer("Config options (JSON paths):\n" + TrainConfig::help_text());
  cmd->callback([sub, &run] {
    // Usage, not an error of the run: CLI11's exit code 2 with the usage hint.
    if (sub->config.empty()) throw CLI::RequiredError("train needs --config FILE");
    run = [sub] { return run_train(*sub); };
  });
  // `gpt2-finetune --config run.json` without a subcommand trains too.
  app.callback([top, &app, &run] {
    if (!run && !top->config.empty() && app.get_subcommands().empty()) run = [top] { return run_train(*top); };
  });
}

}  // namespace gpt2ft::cli
