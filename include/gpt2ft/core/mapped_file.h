// A read-only memory map of a whole file (shards, safetensors), unmapped on destruction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>

namespace gpt2ft {

class MappedFile {
 public:
  MappedFile() = default;
  // Maps `path` read-only. Missing or unreadable files are an Error naming the path.
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  void release();

  std::filesystem::path path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace gpt2ft
