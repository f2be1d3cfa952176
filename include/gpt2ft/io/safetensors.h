// The safetensors format (Hugging Face): an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw tensor bytes.
// Reads are memory-mapped and every offset, dtype and shape is validated before use.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/ScalarType.h>
#include <torch/types.h>

#include "gpt2ft/core/mapped_file.h"

namespace gpt2ft {

struct SafetensorsEntry {
  std::string dtype;            // as written in the file: "F32", "BF16", ...
  c10::ScalarType scalar_type;  // the same as a torch dtype
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section
  uint64_t end = 0;
};

class SafetensorsReader {
 public:
  // Maps and validates the whole header; any inconsistency is an Error naming the file.
  explicit SafetensorsReader(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return file_.path(); }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const;

  // A CPU tensor holding a copy of `name`, converted to `dtype` when given.
  torch::Tensor load(const std::string& name,
                     std::optional<c10::ScalarType> dtype = std::nullopt) const;
  // Copies `name` into `target` (any device and dtype). A missing tensor or another shape is
  // an Error naming the file and the tensor; `hint` says what that means to the caller.
  void load_into(const std::string& name, torch::Tensor& target, const std::string& hint = "") const;
  // The same, but the stored dtype must be the target's (no conversion).
  void load_exact(const std::string& name, torch::Tensor& target, const std::string& hint = "") const;

 private:
  MappedFile file_;
  uint64_t data_start_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Writes tensors (any device; copied to the CPU) in the order given, via a temporary file.
void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// "F32" <-> torch dtype. Unknown names and unsupported dtypes are Errors.
c10::ScalarType safetensors_dtype_to_scalar(const std::string& dtype, const std::string& where);
std::string scalar_to_safetensors_dtype(c10::ScalarType type);

}  // namespace gpt2ft
