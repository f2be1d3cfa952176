// Crash-safe file writing: bytes go to a temporary name beside the target, are fsync'd,
// and only then renamed over it, so a reader never sees a half-written file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

namespace gpt2ft {

class AtomicFileWriter {
 public:
  // Opens "<dir>/.<name>.tmp.<pid>" for writing; the target is untouched until commit().
  explicit AtomicFileWriter(const std::filesystem::path& target);
  // Without commit() the temporary file is removed.
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, size_t size);
  void write(const std::string& text) { write(text.data(), text.size()); }
  // Overwrites bytes already written (a header patched once the counts are known).
  void write_at(uint64_t offset, const void* data, size_t size);
  // Bytes written so far (the file's end).
  uint64_t size() const { return size_; }
  // Asks the kernel to start writing what was written so far to disk, without waiting: a
  // long file streamed out this way leaves less for commit()'s fsync.
  void start_writeback();
  // fsyncs the data, renames the temporary file to the target and fsyncs the directory.
  void commit();

 private:
  std::filesystem::path target_;
  std::filesystem::path temp_;
  int fd_ = -1;
  uint64_t size_ = 0;
  uint64_t written_back_ = 0;
};

// Writes a whole file atomically.
void write_file_atomic(const std::filesystem::path& target, const std::string& contents);

// fsyncs a directory so that renames inside it survive a crash.
void fsync_directory(const std::filesystem::path& dir);

// The largest file read_text_file reads.
inline constexpr int64_t kMaxTextFileBytes = int64_t{256} << 20;

// Reads a whole (small) regular file; an Error naming the path if it cannot, if it is not a
// regular file (a FIFO, a device) or if it is larger than kMaxTextFileBytes.
std::string read_text_file(const std::filesystem::path& path);

}  // namespace gpt2ft
