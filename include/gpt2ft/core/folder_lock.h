// An advisory lock on a folder a command writes into (a run's output_dir, tokenize's
// --output-dir): a second process that would write there too is refused with who holds it,
// instead of both writing (interleaved metrics, a run dying later at a rename, lost shards).
// flock(2) on <dir>/.gpt2ft-lock: the kernel drops it when the holder exits, however it exits,
// so a crash or kill -9 never leaves a stale lock behind (only, then, an unlocked file that the
// next process takes over). A holder that ends normally removes the file.
#pragma once

#include <filesystem>
#include <string>

namespace gpt2ft {

class FolderLock {
 public:
  // Creates `dir` if needed and locks it; an Error naming the holder (pid, host, command,
  // start time) when another process has it. `what` says what the folder is ("output_dir").
  FolderLock(const std::filesystem::path& dir, const std::string& what);
  ~FolderLock();
  FolderLock(const FolderLock&) = delete;
  FolderLock& operator=(const FolderLock&) = delete;

  static constexpr const char* kFileName = ".gpt2ft-lock";

 private:
  std::filesystem::path file_;
  int fd_ = -1;
};

}  // namespace gpt2ft
