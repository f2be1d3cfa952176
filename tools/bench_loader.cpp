// Loader throughput: tokens per second delivered by DataLoader::next() on the CPU for a
// given micro batch, sequence length and worker count. Prints one JSON line.
//   bench_loader SHARD_GLOB SEQ_LEN MICRO_BATCH WORKERS BATCHES
#include <chrono>
#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "gpt2ft/core/error.h"
#include "gpt2ft/data/loader.h"
#include "gpt2ft/data/shard.h"

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: bench_loader SHARD_GLOB SEQ_LEN MICRO_BATCH WORKERS BATCHES\n");
    return 2;
  }
  try {
    gpt2ft::LoaderOptions o;
    o.shards = gpt2ft::expand_glob(argv[1], "shards");
    o.seq_len = std::stoll(argv[2]);
    o.micro_batch = std::stoll(argv[3]);
    o.num_workers = std::stoi(argv[4]);
    o.prefetch = 2 * o.num_workers + 2;
    o.vocab_size = 50257;
    const int batches = std::stoi(argv[5]);
    gpt2ft::DataLoader loader(o);
    loader.next();  // warm-up: the first epoch's order is built here
    const auto start = std::chrono::steady_clock::now();
    int64_t checksum = 0;
    for (int i = 0; i < batches; ++i) checksum += loader.next().x[0][0].item<int64_t>();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double tokens = static_cast<double>(batches) * o.micro_batch * o.seq_len;
    std::cout << nlohmann::json{{"workers", o.num_workers}, {"micro_batch", o.micro_batch}, {"seq_len", o.seq_len},
                                {"batches", batches}, {"tokens_per_s", tokens / secs}, {"checksum", checksum}}.dump()
              << std::endl;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_loader: %s\n", gpt2ft::describe_exception(e).c_str());
    return 1;
  }
  return 0;
}
