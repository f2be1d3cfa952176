// Test helper: encodes every string of a file with a tokenizer and writes one JSON line per
// string: {"ids": [...], "round_trip": decode(ids) == input, "decoded_hex": hex of decode(ids)}. Input records are a uint32
// little-endian byte length followed by the raw bytes (any bytes, not only valid UTF-8).
//   tokenizer_tool TOKENIZER_PATH STRINGS_FILE OUTPUT_JSONL
#include <cstdio>
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "gpt2ft/core/error.h"
#include "gpt2ft/tokenizer/tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: tokenizer_tool TOKENIZER STRINGS OUT\n");
    return 2;
  }
  try {
    const auto tokenizer = gpt2ft::load_tokenizer(argv[1]);
    std::ifstream in(argv[2], std::ios::binary);
    std::ofstream out(argv[3]);
    uint32_t length = 0;
    while (in.read(reinterpret_cast<char*>(&length), 4)) {
      std::string text(length, '\0');
      in.read(text.data(), length);
      const auto ids = tokenizer->encode(text);
      const std::string decoded = tokenizer->decode(ids);
      std::string hex;
      for (unsigned char c : decoded) {
        static const char* digits = "0123456789abcdef";
        hex += digits[c >> 4];
        hex += digits[c & 15];
      }
      out << nlohmann::json{{"ids", ids}, {"round_trip", decoded == text}, {"decoded_hex", hex}}.dump() << "\n";
    }
    std::cout << nlohmann::json{{"vocab_size", tokenizer->vocab_size()},
                                {"eot_id", tokenizer->eot_id() ? int64_t(*tokenizer->eot_id()) : -1},
                                {"identity", tokenizer->identity()}}.dump() << std::endl;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tokenizer_tool: %s\n", gpt2ft::describe_exception(e).c_str());
    return 1;
  }
  return 0;
}
