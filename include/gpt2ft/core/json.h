// Reading JSON the program did not write (configs, checkpoints' state, model folders, token
// files): nesting is limited before anything recurses into the document (copying, dumping
// and destroying a deeply nested value are recursive and would overflow the stack).
#pragma once

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace gpt2ft {

// Deeper than any file we read legitimately (configs nest 3 levels, tokenizer.json 5).
inline constexpr int kMaxJsonDepth = 64;

// Parses `text`; nesting deeper than kMaxJsonDepth is an Error naming `where`. Syntax errors
// are nlohmann::json::parse_error, for the caller to word.
nlohmann::json parse_json_limited(std::string_view text, const std::string& where, bool ignore_comments = false);

// Reads and parses a file: a missing file, bad syntax or too deep nesting are Errors naming it.
nlohmann::json read_json_file(const std::string& path, bool ignore_comments = false);

}  // namespace gpt2ft
