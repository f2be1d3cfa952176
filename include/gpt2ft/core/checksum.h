// A fast 64-bit checksum of a file's bytes, to notice damaged checkpoint files. Not
// cryptographic: it detects accidents (flipped or lost bytes), not tampering.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

namespace gpt2ft {

// The checksum of a whole file as 16 hex digits; an unreadable file is an Error naming it.
std::string file_checksum(const std::filesystem::path& path);

}  // namespace gpt2ft
