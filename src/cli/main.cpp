// gpt2-finetune: the command line. It parses arguments and calls the gpt2ft library; every
// error ends here as one line on stderr and a documented exit code.
#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <torch/version.h>

#include "commands.h"
#include "gpt2ft/core/error.h"

int main(int argc, char** argv) {
  using namespace gpt2ft;
  // Logs go to stderr, so stdout carries only results (--json lines, generated text).
  spdlog::set_default_logger(spdlog::stderr_color_mt("gpt2-finetune"));
  spdlog::set_pattern("[%H:%M:%S] %^%l%$ %v");
  CLI::App app{"gpt2-finetune: fine-tune GPT-2 models on your own text"};
  app.set_version_flag("--version", std::string("gpt2-finetune ") + GPT2FT_VERSION + " (libtorch " + TORCH_VERSION + ")");
  app.require_subcommand(0, 1);
  cli::Runner run;
  cli::add_init_command(app, run);
  cli::add_eval_command(app, run);
  cli::add_tokenize_command(app, run);
  cli::add_train_command(app, run);
  cli::add_generate_command(app, run);
  cli::add_plan_command(app, run);
  cli::add_merge_lora_command(app, run);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  if (!run) {
    std::fprintf(stderr, "%s\nRun with --help for more information.\n", "gpt2-finetune: give a subcommand or --config FILE");
    return kExitUsage;
  }
  try {
    return run();
  } catch (const ExitRequest& e) {
    std::fprintf(stderr, "gpt2-finetune: %s\n", e.what());
    return e.code();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpt2-finetune: error: %s\n", describe_exception(e).c_str());
    return kExitError;
  }
}
