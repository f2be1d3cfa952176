// Fuzz target: a safetensors file (header and data) through SafetensorsReader, then every
// tensor it accepts loaded.
#include "fuzz_support.h"
#include "gpt2ft/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return gpt2ft::fuzz::refuse_cleanly([&] {
    gpt2ft::SafetensorsReader reader(gpt2ft::fuzz::as_file(data, size));
    for (const auto& [name, entry] : reader.entries()) {
      if (entry.end - entry.begin <= (1u << 20)) (void)reader.load(name);
    }
  });
}
