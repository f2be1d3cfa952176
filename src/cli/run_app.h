// The body of the command line, shared by the executable (tokenize, --version) and
// libgpt2ft_cli.so (every command): parse, run the chosen command, and turn every error into
// one line on stderr and a documented exit code.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

#include "commands.h"

namespace gpt2ft::cli {

// The --version line: the project's version and the libtorch it was built against.
const char* version_line();

// Registers `add_commands`' subcommands on the app and runs what argv asks for.
int run_app(int argc, char** argv, const std::function<void(CLI::App&, Runner&)>& add_commands);

}  // namespace gpt2ft::cli
