// Fuzz target: a tokenizer.json through the byte-level BPE loader (layout, vocabulary, merges,
// the pipeline options it refuses), and when accepted, a round of encoding and decoding.
#include "fuzz_support.h"
#include "gpt2ft/tokenizer/byte_level_bpe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return gpt2ft::fuzz::refuse_cleanly([&] {
    const auto dir = gpt2ft::fuzz::in_folder(data, size, "tokenizer.json");
    const auto tokenizer = gpt2ft::ByteLevelBpe::from_folder(dir);
    const auto ids = tokenizer->encode("Hello world, caf\xc3\xa9 12345 <|endoftext|>  \n\n");
    std::vector<uint32_t> in_vocab;
    for (const uint32_t id : ids) {
      if (id < tokenizer->vocab_size()) in_vocab.push_back(id);
    }
    (void)tokenizer->decode(in_vocab);
  });
}
