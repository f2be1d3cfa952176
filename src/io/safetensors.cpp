// safetensors reader and writer.
#include "gpt2ft/io/safetensors.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string_view>

#include <nlohmann/json.hpp>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/json.h"

namespace gpt2ft {
namespace {

using nlohmann::json;

// The safetensors specification caps the header at 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;

const std::vector<std::pair<std::string, c10::ScalarType>>& dtype_table() {
  static const std::vector<std::pair<std::string, c10::ScalarType>> table = {
      {"F64", c10::kDouble}, {"F32", c10::kFloat}, {"F16", c10::kHalf},  {"BF16", c10::kBFloat16},
      {"I64", c10::kLong},   {"I32", c10::kInt},   {"I16", c10::kShort}, {"I8", c10::kChar},
      {"U8", c10::kByte},    {"BOOL", c10::kBool}};
  return table;
}

}  // namespace

c10::ScalarType safetensors_dtype_to_scalar(const std::string& dtype, const std::string& where) {
  for (const auto& [name, type] : dtype_table()) {
    if (name == dtype) return type;
  }
  throw Error(where + ": unsupported dtype \"" + dtype +
              "\" (expected one of F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL)");
}

std::string scalar_to_safetensors_dtype(c10::ScalarType type) {
  for (const auto& [name, t] : dtype_table()) {
    if (t == type) return name;
  }
  throw Error(std::string("cannot store dtype ") + c10::toString(type) + " in safetensors");
}

namespace {

// One tensor's header entry, checked on its own against a data section of data_size bytes.
SafetensorsEntry parse_entry(const json& value, const std::string& at, uint64_t data_size) {
  if (!value.is_object() || !value.contains("dtype") || !value.contains("shape") || !value.contains("data_offsets")) {
    throw Error(at + ": expected an object with dtype, shape and data_offsets");
  }
  SafetensorsEntry entry;
  if (!value["dtype"].is_string()) throw Error(at + ": dtype is not a string");
  entry.dtype = value["dtype"].get<std::string>();
  entry.scalar_type = safetensors_dtype_to_scalar(entry.dtype, at);
  const json& shape = value["shape"];
  if (!shape.is_array()) throw Error(at + ": shape is not an array");
  uint64_t bytes = c10::elementSize(entry.scalar_type);  // the shape's size, checked against overflow
  for (const auto& dim : shape) {
    if (!dim.is_number_unsigned()) throw Error(at + ": shape " + shape.dump() + " has a non-integer or negative dimension");
    const uint64_t d = dim.get<uint64_t>();
    if (d > static_cast<uint64_t>(INT64_MAX) || (d != 0 && bytes > UINT64_MAX / d)) {
      throw Error(at + ": shape " + shape.dump() + " is too large for any file");
    }
    entry.shape.push_back(static_cast<int64_t>(d));
    bytes *= d;
  }
  const json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned()) {
    throw Error(at + ": data_offsets must be two non-negative integers, got " + offsets.dump());
  }
  entry.begin = offsets[0].get<uint64_t>();
  entry.end = offsets[1].get<uint64_t>();
  if (entry.begin > entry.end || entry.end > data_size) {
    throw Error(at + ": data_offsets [" + std::to_string(entry.begin) + ", " + std::to_string(entry.end) +
                "] fall outside the data section of " + std::to_string(data_size) + " bytes (truncated or corrupt file)");
  }
  if (entry.end - entry.begin != bytes) {
    throw Error(at + ": shape " + shape.dump() + " of " + entry.dtype + " needs " + std::to_string(bytes) +
                " bytes but data_offsets span " + std::to_string(entry.end - entry.begin));
  }
  return entry;
}

// The format's layout rule, as the safetensors library enforces it: in offset order the
// tensors cover the data section exactly, from byte 0 to its end, without gaps or overlaps.
// A header length off by a byte, or bytes appended to the file, break it.
void check_layout(const std::map<std::string, SafetensorsEntry>& entries, uint64_t data_size, const std::string& where) {
  std::vector<std::pair<std::pair<uint64_t, uint64_t>, const std::string*>> by_offset;
  for (const auto& [name, entry] : entries) by_offset.push_back({{entry.begin, entry.end}, &name});
  std::sort(by_offset.begin(), by_offset.end());
  uint64_t expected = 0;
  const std::string* previous = nullptr;
  for (const auto& [range, name] : by_offset) {
    if (range.first < expected) {
      throw Error(where + ": tensors \"" + *previous + "\" and \"" + *name +
                  "\" overlap in the data section (corrupt file)");
    }
    if (range.first > expected) {
      throw Error(where + ": tensor \"" + *name + "\" starts at byte " + std::to_string(range.first) +
                  " of the data section but the tensors before it end at " + std::to_string(expected) +
                  " (the header length or the offsets are wrong: corrupt file)");
    }
    expected = range.second;
    if (range.second > range.first) previous = name;
  }
  if (expected != data_size) {
    throw Error(where + ": the tensors end at byte " + std::to_string(expected) + " of the data section but it holds " +
                std::to_string(data_size) + " bytes (a wrong header length, or bytes after the data: corrupt file)");
  }
}

}  // namespace

SafetensorsReader::SafetensorsReader(const std::filesystem::path& path) : file_(path) {
  const std::string where = path.string();
  const uint64_t file_size = file_.size();
  if (file_size < 8) {
    throw Error(where + ": truncated safetensors file (" + std::to_string(file_size) +
                " bytes; expected at least the 8-byte header length)");
  }
  uint64_t header_len = 0;
  std::memcpy(&header_len, file_.data(), 8);  // little-endian on every platform we build for
  if (header_len > kMaxHeaderBytes || header_len > file_size - 8) {
    throw Error(where + ": header length " + std::to_string(header_len) + " does not fit in the file (" +
                std::to_string(file_size) + " bytes); the file is truncated or not safetensors");
  }
  data_start_ = 8 + header_len;
  const uint64_t data_size = file_size - data_start_;

  json header;
  try {
    header = parse_json_limited(std::string_view(reinterpret_cast<const char*>(file_.data()) + 8, header_len),
                                where + " (header)");
  } catch (const json::exception& e) {
    throw Error(where + ": the JSON header does not parse (" + e.what() + ")");
  }
  if (!header.is_object()) throw Error(where + ": the JSON header is not an object");
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) throw Error(where + ": __metadata__ is not an object");
      for (const auto& [key, text] : value.items()) {
        if (!text.is_string()) throw Error(where + ": __metadata__." + key + " is not a string");
        metadata_[key] = text.get<std::string>();
      }
      continue;
    }
    entries_.emplace(name, parse_entry(value, where + ": tensor \"" + name + "\"", data_size));
  }
  check_layout(entries_, data_size, where);
}

const SafetensorsEntry& SafetensorsReader::entry(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) throw Error(path().string() + ": no tensor named \"" + name + "\"");
  return it->second;
}

torch::Tensor SafetensorsReader::load(const std::string& name,
                                      std::optional<c10::ScalarType> dtype) const {
  const SafetensorsEntry& e = entry(name);
  if (dtype && c10::isFloatingType(*dtype) != c10::isFloatingType(e.scalar_type)) {
    throw Error(path().string() + ": \"" + name + "\" is stored as " + scalar_to_safetensors_dtype(e.scalar_type) +
                " but a " + (c10::isFloatingType(*dtype) ? "floating-point" : "integer") +
                " tensor is expected there; the file is not what it claims to be");
  }
  torch::Tensor out = torch::empty(e.shape, torch::TensorOptions().dtype(e.scalar_type));
  if (e.end > e.begin) std::memcpy(out.data_ptr(), file_.data() + data_start_ + e.begin, e.end - e.begin);
  if (c10::isFloatingType(e.scalar_type) && out.numel() > 0 && !torch::isfinite(out).all().item<bool>()) {
    const int64_t bad = out.numel() - torch::isfinite(out).sum().item<int64_t>();
    throw Error(path().string() + ": \"" + name + "\" holds NaN or infinite values (" + std::to_string(bad) + " of " +
                std::to_string(out.numel()) + "); a model, adapter or optimizer state with them cannot train or "
                "predict. Use an earlier checkpoint or the original weights");
  }
  if (dtype && *dtype != e.scalar_type) out = out.to(*dtype);
  return out;
}

void SafetensorsReader::load_into(const std::string& name, torch::Tensor& target, const std::string& hint) const {
  const std::string why = hint.empty() ? "" : " (" + hint + ")";
  if (!contains(name)) throw Error(path().string() + ": missing \"" + name + "\"" + why);
  if (entry(name).shape != target.sizes().vec()) {
    throw Error(path().string() + ": \"" + name + "\" has the wrong shape for this model" + why);
  }
  torch::NoGradGuard no_grad;
  target.copy_(load(name, target.scalar_type()));
}

void SafetensorsReader::load_exact(const std::string& name, torch::Tensor& target, const std::string& hint) const {
  if (contains(name) && entry(name).scalar_type != target.scalar_type()) {
    throw Error(path().string() + ": \"" + name + "\" is " + entry(name).dtype + ", expected " +
                scalar_to_safetensors_dtype(target.scalar_type()) + (hint.empty() ? "" : " (" + hint + ")"));
  }
  load_into(name, target, hint);
}

void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> cpu;
  cpu.reserve(tensors.size());
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (header.contains(name)) throw Error(path.string() + ": tensor \"" + name + "\" given twice");
    torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
    if (c10::isFloatingType(t.scalar_type()) && t.numel() > 0 && !torch::isfinite(t).all().item<bool>()) {
      const int64_t bad = t.numel() - torch::isfinite(t).sum().item<int64_t>();
      throw Error(path.string() + ": not written: tensor \"" + name + "\" holds NaN or infinite values (" +
                  std::to_string(bad) + " of " + std::to_string(t.numel()) + ", " +
                  scalar_to_safetensors_dtype(t.scalar_type()) +
                  "). Values beyond float16's range (65504) become infinite when saved as float16: save as bfloat16 "
                  "or float32; NaN means the training diverged");
    }
    const uint64_t bytes = t.numel() * t.element_size();
    header[name] = {{"dtype", scalar_to_safetensors_dtype(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    cpu.push_back(std::move(t));
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  const uint64_t header_len = header_text.size();

  AtomicFileWriter writer(path);
  writer.write(&header_len, 8);
  writer.write(header_text);
  for (const auto& t : cpu) writer.write(t.data_ptr(), t.numel() * t.element_size());
  writer.commit();
}

}  // namespace gpt2ft
