// Fuzz target: a chat template file through the Jinja subset's lexer and parser, and when
// accepted, rendered on a short conversation with and without the generation prompt.
#include "fuzz_support.h"
#include "gpt2ft/tokenizer/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return gpt2ft::fuzz::refuse_cleanly([&] {
    const gpt2ft::ChatTemplate chat_template(std::string(reinterpret_cast<const char*>(data), size), "fuzz.jinja");
    const std::vector<gpt2ft::ChatMessage> messages = {
        {"system", " Be brief. "}, {"user", "Hi <|im_end|> {{ x }}"}, {"assistant", ""}, {"user", "caf\xc3\xa9"}};
    for (const bool prompt : {false, true}) {
      (void)chat_template.render(messages, prompt, {{"bos_token", "<|endoftext|>"}, {"eos_token", "<|endoftext|>"}});
    }
    (void)chat_template.control_strings();
  });
}
