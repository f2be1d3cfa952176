// The command line's shared body (run_app.h).
#include "run_app.h"

#include <cstdio>
#include <string>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <torch/version.h>

#include "gpt2ft/core/error.h"

namespace gpt2ft::cli {

const char* version_line() { return "gpt2-finetune " GPT2FT_VERSION " (libtorch " TORCH_VERSION ")"; }

int run_app(int argc, char** argv, const std::function<void(CLI::App&, Runner&)>& add_commands) {
  // Logs go to stderr, so stdout carries only results (--json lines, generated text).
  spdlog::set_default_logger(spdlog::stderr_color_mt("gpt2-finetune"));
  spdlog::set_pattern("[%H:%M:%S] %^%l%$ %v");
  CLI::App app{"gpt2-finetune: fine-tune GPT-2 models on your own text"};
  app.set_version_flag("--version", version_line());
  app.require_subcommand(0, 1);
  Runner run;
  add_commands(app, run);

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

}  // namespace gpt2ft::cli
