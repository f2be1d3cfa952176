// Tokenizer throughput: encodes the paragraphs of a text file (split at blank lines) with
// our tokenizer on 1..N threads and prints one JSON line per thread count with the median
// MB/s over the repeats. Each repeat uses a fresh tokenizer, so the piece cache starts cold.
//   bench_tokenizer TOKENIZER TEXT_FILE THREADS REPEATS
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <thread>

#include <nlohmann/json.hpp>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/tokenizer/tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: bench_tokenizer TOKENIZER TEXT_FILE THREADS REPEATS\n");
    return 2;
  }
  try {
    const std::string text = gpt2ft::read_text_file(argv[2]);
    std::vector<std::string_view> paragraphs;
    for (size_t pos = 0; pos < text.size();) {
      size_t end = text.find("\n\n", pos);
      end = end == std::string::npos ? text.size() : end + 2;
      paragraphs.emplace_back(text.data() + pos, end - pos);
      pos = end;
    }
    const int threads = std::stoi(argv[3]), repeats = std::stoi(argv[4]);
    std::vector<double> seconds;
    size_t tokens = 0;
    for (int r = 0; r < repeats; ++r) {
      const auto tokenizer = gpt2ft::load_tokenizer(argv[1]);
      std::vector<size_t> counts(static_cast<size_t>(threads), 0);
      const auto start = std::chrono::steady_clock::now();
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          std::vector<uint32_t> ids;
          for (size_t i = static_cast<size_t>(t); i < paragraphs.size(); i += static_cast<size_t>(threads)) {
            ids.clear();
            tokenizer->encode(paragraphs[i], ids);
            counts[static_cast<size_t>(t)] += ids.size();
          }
        });
      }
      for (auto& p : pool) p.join();
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      tokens = 0;
      for (size_t c : counts) tokens += c;
    }
    std::sort(seconds.begin(), seconds.end());
    const double median = seconds[seconds.size() / 2];
    std::cout << nlohmann::json{{"system", "gpt2-finetune"}, {"threads", threads}, {"bytes", text.size()},
                                {"tokens", tokens}, {"median_seconds", median},
                                {"mb_per_s", text.size() / 1e6 / median}}.dump()
              << std::endl;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_tokenizer: %s\n", gpt2ft::describe_exception(e).c_str());
    return 1;
  }
  return 0;
}
