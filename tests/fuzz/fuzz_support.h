// Shared by the fuzz targets: an input as a file (the readers under test map files), and
// what counts as a clean refusal. Anything else escaping a target (a crash, a sanitizer
// report, another exception) is a finding.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "gpt2ft/core/error.h"

namespace gpt2ft::fuzz {

// The input written to a per-process scratch file (in /dev/shm when there is one).
inline std::filesystem::path as_file(const uint8_t* data, size_t size) {
  static const std::filesystem::path path =
      (std::filesystem::exists("/dev/shm") ? std::filesystem::path("/dev/shm") : std::filesystem::temp_directory_path()) /
      ("gpt2ft-fuzz-" + std::to_string(::getpid()));
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (size > 0) std::fwrite(data, 1, size, f);
  std::fclose(f);
  return path;
}

// The input written as `name` in a per-process scratch folder (for readers that take a folder).
inline std::filesystem::path in_folder(const uint8_t* data, size_t size, const std::string& name) {
  static const std::filesystem::path dir =
      (std::filesystem::exists("/dev/shm") ? std::filesystem::path("/dev/shm") : std::filesystem::temp_directory_path()) /
      ("gpt2ft-fuzz-dir-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::FILE* f = std::fopen((dir / name).c_str(), "wb");
  if (size > 0) std::fwrite(data, 1, size, f);
  std::fclose(f);
  return dir;
}

// Runs `body`; our Error (a one-line refusal) and JSON syntax errors are expected outcomes.
template <class F>
int refuse_cleanly(F&& body) {
  try {
    body();
  } catch (const Error&) {
  } catch (const nlohmann::json::exception&) {
  }
  return 0;
}

}  // namespace gpt2ft::fuzz
