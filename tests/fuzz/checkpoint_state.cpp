// Fuzz target: a checkpoint's trainer_state.json through parse_training_state.
#include "fuzz_support.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/train/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return gpt2ft::fuzz::refuse_cleanly([&] {
    const auto j = gpt2ft::parse_json_limited(std::string_view(reinterpret_cast<const char*>(data), size),
                                              "trainer_state.json");
    (void)gpt2ft::parse_training_state(j, "trainer_state.json");
  });
}
