// Depth-limited JSON parsing.
#include "gpt2ft/core/json.h"

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/error.h"

namespace gpt2ft {

nlohmann::json parse_json_limited(std::string_view text, const std::string& where, bool ignore_comments) {
  using nlohmann::json;
  const json::parser_callback_t limit = [&](int depth, json::parse_event_t event, json&) {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= kMaxJsonDepth) {
      throw Error(where + ": JSON nested deeper than " + std::to_string(kMaxJsonDepth) +
                  " levels; this is not a file gpt2-finetune reads");
    }
    return true;
  };
  return json::parse(text.begin(), text.end(), limit, /*allow_exceptions=*/true, ignore_comments);
}

nlohmann::json read_json_file(const std::string& path, bool ignore_comments) {
  const std::string text = read_text_file(path);
  try {
    return parse_json_limited(text, path, ignore_comments);
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": not valid JSON (" + e.what() + ")");
  }
}

}  // namespace gpt2ft
