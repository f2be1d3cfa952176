// TensorBoard event files, written without TensorBoard or protobuf: a TFRecord stream
// (uint64 length, masked CRC32C of the length, the bytes, masked CRC32C of the bytes) of
// tensorflow.Event messages encoded by hand. Fields used (tensorflow/core/util/event.proto,
// summary.proto):
//   Event:      wall_time 1 (double), step 2 (int64), file_version 3 (string),
//               summary 5 (Summary), session_log 7 (SessionLog)
//   Summary:    value 1 (repeated Value);  Value: tag 1 (string), simple_value 2 (float)
//   SessionLog: status 1 (enum; START = 1)
// The file is named events.out.tfevents.<seconds>.<host>.<pid>.<n>, as TensorBoard globs it,
// with <seconds> above every earlier file's in the folder: TensorBoard reads the files in name
// order, and a restart marker must come after what it replaces.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

namespace gpt2ft {

// CRC-32C (Castagnoli) of `size` bytes, and TFRecord's mask of it.
uint32_t crc32c(const void* data, size_t size);
uint32_t masked_crc32c(const void* data, size_t size);

class TensorBoardWriter {
 public:
  // Creates `dir` and a new event file in it, whose first record names the format.
  explicit TensorBoardWriter(const std::filesystem::path& dir);

  // Scalars of one step, each a Summary value with its tag; flushed to the file.
  void scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);
  // A SessionLog START at `step`: TensorBoard drops what earlier files logged at this step and
  // after, so a resumed run does not draw its replayed steps twice.
  void restart(int64_t step);

  const std::filesystem::path& path() const { return path_; }

 private:
  void record(const std::string& event);
  std::filesystem::path path_;
  std::ofstream out_;
};

}  // namespace gpt2ft
