// Fuzz target: a model config.json through GPT2Config (parse, validate) and, when accepted,
// what is derived from it before a model is built.
#include "fuzz_support.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return gpt2ft::fuzz::refuse_cleanly([&] {
    const auto j = gpt2ft::parse_json_limited(std::string_view(reinterpret_cast<const char*>(data), size), "config.json");
    const gpt2ft::GPT2Config c = gpt2ft::GPT2Config::from_json(j, "config.json");
    (void)c.weight_bytes();
    (void)c.parameter_shapes();
    (void)c.to_json().dump();
  });
}
