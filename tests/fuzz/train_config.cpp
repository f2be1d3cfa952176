// Fuzz target: a training config through TrainConfig::parse, and the resolved config printed
// and parsed back.
#include "fuzz_support.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/train/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return gpt2ft::fuzz::refuse_cleanly([&] {
    const auto j = gpt2ft::parse_json_limited(std::string_view(reinterpret_cast<const char*>(data), size), "run.json",
                                              /*ignore_comments=*/true);
    const gpt2ft::TrainConfig c = gpt2ft::TrainConfig::parse(j, {}, "run.json");
    (void)gpt2ft::TrainConfig::parse(c.to_json());
    (void)c.checkpoint_every_n_blocks();
  });
}
