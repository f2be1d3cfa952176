// libgpt2ft_cli.so: every command of gpt2-finetune, behind one C entry point that the
// executable finds with dlsym (main.cpp).
#include "run_app.h"

extern "C" __attribute__((visibility("default"))) int gpt2ft_cli_main(int argc, char** argv) {
  using namespace gpt2ft::cli;
  return run_app(argc, argv, [](CLI::App& app, Runner& run) {
    add_init_command(app, run);
    add_eval_command(app, run);
    add_tokenize_command(app, run);
    add_train_command(app, run);
    add_generate_command(app, run);
    add_plan_command(app, run);
    add_merge_lora_command(app, run);
  });
}
