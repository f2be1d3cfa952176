// A fast 64-bit checksum of a file's bytes, to notice damaged checkpoint files. Not
// cryptographic: it detects accidents (flipped or lost bytes), not tampering.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

namespace gpt2ft {

// The checksum of a whole file as 16 hex digits; an unreadable file is an Error naming it.
std::string file_checksum(const std::filesystem::path& path);

// A cheap identity of a large file: its size and the checksum of its first and last
// `sample_bytes` (all of it when smaller), as 16 hex digits. Two files that differ there or in
// size differ here; for shards and weights that is any re-tokenization or other model.
std::string file_sample_checksum(const std::filesystem::path& path, size_t sample_bytes = size_t{1} << 20);

// The same checksum of bytes in memory, as a number (a shard's document and target sections).
uint64_t bytes_checksum(const void* data, size_t size);

}  // namespace gpt2ft
