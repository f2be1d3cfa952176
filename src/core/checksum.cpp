// File checksums: eight bytes at a time through an xor-multiply chain (each step is a
// bijection of the running value, so any single changed word changes the result), then a
// final avalanche.
#include "gpt2ft/core/checksum.h"

#include <cstring>

#include <fmt/format.h>

#include "gpt2ft/core/mapped_file.h"

namespace gpt2ft {

namespace {

constexpr uint64_t kPrime = 0x9E3779B97F4A7C15ull;  // odd: multiplication by it is invertible

uint64_t chain(uint64_t h, const uint8_t* p, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t word;
    std::memcpy(&word, p + i, 8);
    h = (h ^ word) * kPrime;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * kPrime;
  return h;
}

uint64_t avalanche(uint64_t h) {
  h ^= h >> 33;
  h *= 0xFF51AFD7ED558CCDull;
  h ^= h >> 33;
  return h;
}

std::string finish(uint64_t h) { return fmt::format("{:016x}", avalanche(h)); }

}  // namespace

std::string file_checksum(const std::filesystem::path& path) {
  const MappedFile file(path);
  return finish(chain(0xCBF29CE484222325ull ^ file.size(), file.data(), file.size()));
}

std::string file_sample_checksum(const std::filesystem::path& path, size_t sample_bytes) {
  const MappedFile file(path);
  const size_t n = file.size();
  uint64_t h = 0xCBF29CE484222325ull ^ n;
  if (n <= 2 * sample_bytes) return finish(chain(h, file.data(), n));
  h = chain(h, file.data(), sample_bytes);
  return finish(chain(h, file.data() + n - sample_bytes, sample_bytes));
}

uint64_t bytes_checksum(const void* data, size_t size) {
  return avalanche(chain(0xCBF29CE484222325ull ^ size, static_cast<const uint8_t*>(data), size));
}

}  // namespace gpt2ft
