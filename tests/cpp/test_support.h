// Helpers shared by the C++ tests: where the generated reference data lives, temporary
// folders, and tensor comparisons that report the worst difference.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "gpt2ft/model/gpt2.h"

namespace gpt2ft::test {

// The folder make_golden.py wrote (ctest sets GPT2FT_GOLDEN_DIR); empty when unset.
inline std::filesystem::path golden_dir() {
  const char* dir = std::getenv("GPT2FT_GOLDEN_DIR");
  return dir ? std::filesystem::path(dir) : std::filesystem::path();
}

// A fresh, empty folder under the system temp dir, removed at destruction.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::filesystem::temp_directory_path() /
            ("gpt2ft-" + std::string(info ? info->name() : "test") + "-" + std::to_string(::getpid()));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kCPU, torch::kDouble) - b.to(torch::kCPU, torch::kDouble)).abs().max().item<double>();
}

// The loss transformers computes with labels=ids: logits (B, T, V) at each position scored
// against the next id of ids (B, T).
inline torch::Tensor shifted_loss(const torch::Tensor& logits, const torch::Tensor& ids) {
  const int64_t T = ids.size(1);
  return next_token_loss(logits.narrow(1, 0, T - 1), ids.narrow(1, 1, T - 1));
}

// Asserts `body` throws an exception whose message contains every fragment.
template <class F>
void expect_error_containing(F&& body, std::initializer_list<std::string> fragments) {
  try {
    body();
    ADD_FAILURE() << "expected an error mentioning \"" << *fragments.begin() << "\"";
  } catch (const std::exception& e) {
    const std::string message = e.what();
    for (const auto& f : fragments) {
      EXPECT_NE(message.find(f), std::string::npos) << "message: " << message << "\nmissing: " << f;
    }
  }
}

}  // namespace gpt2ft::test
