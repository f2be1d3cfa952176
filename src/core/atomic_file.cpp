// Temporary-name-then-rename file writing.
#include "gpt2ft/core/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "gpt2ft/core/error.h"
#include "gpt2ft/core/mapped_file.h"

namespace gpt2ft {
namespace {

std::string errno_text() { return std::strerror(errno); }

}  // namespace

AtomicFileWriter::AtomicFileWriter(const std::filesystem::path& target) : target_(target) {
  std::filesystem::path dir = target.parent_path();
  if (dir.empty()) dir = ".";
  temp_ = dir / ("." + target.filename().string() + ".tmp." + std::to_string(::getpid()));
  fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    throw Error(target.string() + ": cannot create temporary file " + temp_.string() + " (" +
                errno_text() + ")");
  }
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(temp_.c_str());
  }
}

void AtomicFileWriter::write(const void* data, size_t size) {
  write_at(size_, data, size);
}

void AtomicFileWriter::write_at(uint64_t offset, const void* data, size_t size) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::pwrite(fd_, p, size, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(target_.string() + ": write failed (" + errno_text() + ")");
    }
    p += n;
    offset += static_cast<uint64_t>(n);
    size -= static_cast<size_t>(n);
  }
  size_ = std::max(size_, offset);
}

void AtomicFileWriter::start_writeback() {
  if (size_ <= written_back_) return;
  // Advice only: a filesystem that does not support it leaves everything to the fsync.
  ::sync_file_range(fd_, static_cast<off_t>(written_back_), static_cast<off_t>(size_ - written_back_),
                    SYNC_FILE_RANGE_WRITE);
  written_back_ = size_;
}

void AtomicFileWriter::commit() {
  if (::fsync(fd_) != 0) throw Error(target_.string() + ": fsync failed (" + errno_text() + ")");
  if (::close(fd_) != 0) {
    fd_ = -1;
    ::unlink(temp_.c_str());
    throw Error(target_.string() + ": close failed (" + errno_text() + ")");
  }
  fd_ = -1;
  if (::rename(temp_.c_str(), target_.c_str()) != 0) {
    const std::string why = errno_text();
    ::unlink(temp_.c_str());
    throw Error(target_.string() + ": cannot rename the temporary file into place (" + why + ")");
  }
  std::filesystem::path dir = target_.parent_path();
  fsync_directory(dir.empty() ? std::filesystem::path(".") : dir);
}

void write_file_atomic(const std::filesystem::path& target, const std::string& contents) {
  AtomicFileWriter writer(target);
  writer.write(contents);
  writer.commit();
}

void fsync_directory(const std::filesystem::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // best effort: some filesystems do not allow opening directories
  ::fsync(fd);
  ::close(fd);
}

std::string read_text_file(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path)) throw Error(path.string() + ": cannot open for reading (no such file)");
  // MappedFile refuses what is not a regular file (a FIFO would block, /dev/zero never ends).
  const MappedFile file(path);
  if (file.size() > static_cast<size_t>(kMaxTextFileBytes)) {
    throw Error(path.string() + ": " + std::to_string(file.size()) + " bytes, more than the " +
                std::to_string(kMaxTextFileBytes >> 20) + " MiB a configuration or tokenizer file can be");
  }
  if (file.size() == 0) return {};
  return std::string(reinterpret_cast<const char*>(file.data()), file.size());
}

}  // namespace gpt2ft
