// Fuzz target: a token shard through ShardReader: header, size, every id against a vocabulary.
#include "fuzz_support.h"
#include "gpt2ft/data/shard.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return gpt2ft::fuzz::refuse_cleanly([&] {
    gpt2ft::ShardReader shard(gpt2ft::fuzz::as_file(data, size));
    shard.check_ids(50257);
    for (int64_t d = 0; d < shard.num_documents(); ++d) {
      for (int64_t i = shard.document_start(d); i < shard.document_end(d); ++i) (void)shard.is_target(i);
    }
    if (shard.num_tokens() > 0) {
      int64_t out[4];
      shard.read(0, std::min<int64_t>(4, shard.num_tokens()), out);
    }
  });
}
