// The subcommands of gpt2-finetune. Each registers its options on the app and returns the
// function that runs it once arguments are parsed.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace gpt2ft::cli {

using Runner = std::function<int()>;

// Each add_* registers a subcommand and sets `run` to its action when it is chosen.
void add_init_command(CLI::App& app, Runner& run);
void add_eval_command(CLI::App& app, Runner& run);
void add_tokenize_command(CLI::App& app, Runner& run);
void add_train_command(CLI::App& app, Runner& run);
void add_generate_command(CLI::App& app, Runner& run);
void add_plan_command(CLI::App& app, Runner& run);
void add_merge_lora_command(CLI::App& app, Runner& run);

}  // namespace gpt2ft::cli
