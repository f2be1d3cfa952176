// TensorBoard event files: TFRecord framing and hand-encoded Event protobufs.
#include "gpt2ft/io/tensorboard_events.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>

#include "gpt2ft/core/error.h"

namespace gpt2ft {
namespace {

std::array<uint32_t, 256> crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // the reflected Castagnoli polynomial
    t[i] = c;
  }
  return t;
}

// Protobuf wire format: a field's key is (number << 3 | wire type).
void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void key(std::string& out, int field, int wire_type) { varint(out, static_cast<uint64_t>(field << 3 | wire_type)); }
void bytes_field(std::string& out, int field, const std::string& bytes) {
  key(out, field, 2);
  varint(out, bytes.size());
  out += bytes;
}
void double_field(std::string& out, int field, double v) {
  key(out, field, 1);
  char b[8];
  std::memcpy(b, &v, 8);
  out.append(b, 8);
}
void float_field(std::string& out, int field, float v) {
  key(out, field, 5);
  char b[4];
  std::memcpy(b, &v, 4);
  out.append(b, 4);
}

double wall_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// An Event with its wall time and step, and `rest` (already encoded fields) after them.
std::string event(int64_t step, const std::string& rest) {
  std::string e;
  double_field(e, 1, wall_time());
  key(e, 2, 0);
  varint(e, static_cast<uint64_t>(step));
  return e + rest;
}

}  // namespace

uint32_t crc32c(const void* data, size_t size) {
  static const std::array<uint32_t, 256> table = crc32c_table();
  uint32_t c = 0xFFFFFFFFu;
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < size; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

TensorBoardWriter::TensorBoardWriter(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw Error(dir.string() + ": cannot create the TensorBoard folder (" + ec.message() + ")");
  char host[256] = "localhost";
  ::gethostname(host, sizeof(host) - 1);
  auto seconds = static_cast<int64_t>(wall_time());
  const std::string prefix = "events.out.tfevents.";
  std::string last;  // the greatest event file name: TensorBoard reads the files in name order
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {  // after every earlier file
    const std::string name = entry.path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    last = std::max(last, name);
    const std::string stamp = name.substr(prefix.size(), name.find('.', prefix.size()) - prefix.size());
    if (!stamp.empty() && stamp.size() <= 18 && stamp.find_first_not_of("0123456789") == std::string::npos) {
      seconds = std::max<int64_t>(seconds, std::stoll(stamp) + 1);
    }
  }
  // The stamp must also sort after every name as text ("10000000000" sorts before "9999999999"):
  // then the greatest name's stamp with a digit appended, later in both orders.
  std::string stamp = std::to_string(seconds);
  if (!last.empty() && prefix + stamp + "." <= last) {
    const std::string their = last.substr(prefix.size(), last.find('.', prefix.size()) - prefix.size());
    stamp = their + "1";  // '1' sorts after the '.' that ends their stamp
  }
  for (int n = 0;; ++n) {  // a new file, never another run's
    path_ = dir / (prefix + stamp + "." + host + "." + std::to_string(::getpid()) + "." + std::to_string(n));
    if (!std::filesystem::exists(path_)) break;
  }
  out_.open(path_, std::ios::binary);
  if (!out_) throw Error(path_.string() + ": cannot open for writing");
  std::string version;
  bytes_field(version, 3, "brain.Event:2");
  record(event(0, version));
}

void TensorBoardWriter::record(const std::string& e) {
  const uint64_t length = e.size();
  char header[12];
  std::memcpy(header, &length, 8);
  const uint32_t length_crc = masked_crc32c(header, 8);
  std::memcpy(header + 8, &length_crc, 4);
  const uint32_t data_crc = masked_crc32c(e.data(), e.size());
  out_.write(header, 12);
  out_.write(e.data(), static_cast<std::streamsize>(e.size()));
  out_.write(reinterpret_cast<const char*>(&data_crc), 4);
  out_.flush();
  if (!out_) throw Error(path_.string() + ": write failed (disk full?)");
}

void TensorBoardWriter::scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values) {
  std::string summary;
  for (const auto& [tag, v] : values) {
    std::string value;
    bytes_field(value, 1, tag);
    float_field(value, 2, static_cast<float>(v));
    bytes_field(summary, 1, value);
  }
  std::string rest;
  bytes_field(rest, 5, summary);
  record(event(step, rest));
}

void TensorBoardWriter::restart(int64_t step) {
  std::string session_log;
  key(session_log, 1, 0);
  varint(session_log, 1);  // START
  std::string rest;
  bytes_field(rest, 7, session_log);
  record(event(step, rest));
}

}  // namespace gpt2ft
