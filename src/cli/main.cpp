// gpt2-finetune: the command line. `tokenize` and `--version` run here, in a process that
// never loads libtorch (loading it takes 0.4 s, and tokenize needs none of it); every other
// command, and the top-level --help that lists them all, runs in libgpt2ft_cli.so, loaded from
// the executable's own folder.
#include <dlfcn.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <string_view>

#include "gpt2ft/core/error.h"
#include "run_app.h"

namespace {

// The folder of the running executable, from /proc/self/exe (argv[0] may be a bare name
// found on PATH, or a symbolic link).
std::string executable_folder() {
  std::string path(4096, '\0');
  const ssize_t n = ::readlink("/proc/self/exe", path.data(), path.size());
  if (n <= 0 || static_cast<size_t>(n) >= path.size()) return ".";
  path.resize(static_cast<size_t>(n));
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

int run_full_command_line(int argc, char** argv) {
  const std::string library = executable_folder() + "/libgpt2ft_cli.so";
  // RTLD_GLOBAL: libtorch and its CUDA libraries resolve symbols as if linked in directly.
  void* handle = ::dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (handle == nullptr) {
    std::fprintf(stderr,
                 "gpt2-finetune: error: cannot load %s (%s). It is built with the executable and must stay in the same "
                 "folder: rebuild (scripts/setup.sh), or copy both together\n",
                 library.c_str(), ::dlerror());
    return gpt2ft::kExitError;
  }
  using Main = int (*)(int, char**);
  const auto entry = reinterpret_cast<Main>(::dlsym(handle, "gpt2ft_cli_main"));
  if (entry == nullptr) {
    std::fprintf(stderr, "gpt2-finetune: error: %s has no gpt2ft_cli_main: it is not this version's library; rebuild\n",
                 library.c_str());
    return gpt2ft::kExitError;
  }
  return entry(argc, argv);  // the library stays loaded until exit
}

}  // namespace

int main(int argc, char** argv) {
  using namespace gpt2ft::cli;
  const std::string_view first = argc > 1 ? argv[1] : "";
  if (first == "tokenize" || first == "--version") {
    return run_app(argc, argv, [](CLI::App& app, Runner& run) { add_tokenize_command(app, run); });
  }
  return run_full_command_line(argc, argv);
}
