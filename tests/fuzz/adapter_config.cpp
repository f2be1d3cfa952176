// Fuzz target: a PEFT adapter_config.json through read_adapter_config (every field's type and
// range, the options refused by name), and when accepted, the adapters it would add to a tiny
// model.
#include "fuzz_support.h"
#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/model/lora.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return gpt2ft::fuzz::refuse_cleanly([&] {
    const auto dir = gpt2ft::fuzz::in_folder(data, size, "adapter_config.json");
    const gpt2ft::LoraConfig config = gpt2ft::read_adapter_config(dir);
    gpt2ft::GPT2Config c;
    c.n_layer = 1, c.n_head = 1, c.n_embd = 8, c.vocab_size = 11, c.n_positions = 4;
    gpt2ft::GPT2 model(c);
    gpt2ft::add_lora(model, config);
  });
}
