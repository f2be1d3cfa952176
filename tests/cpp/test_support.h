// Helpers shared by the C++ tests: where the generated reference data lives, temporary
// folders, and tensor comparisons that report the worst difference.
#pragma once

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "gpt2ft/core/reproducible_math.h"
#include "gpt2ft/model/gpt2.h"

namespace gpt2ft::test {

// MKL's reproducible mode, as the CLI sets it (core/reproducible_math.h), at static
// initialisation, before MKL's first call reads it.
inline const bool kReproducibleMath = [] {
  request_reproducible_cpu_math();
  return true;
}();

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

using NamedParams = std::vector<std::pair<std::string, torch::Tensor>>;

// A chain of tanh layers, x (n, widths[0]) -> (n, widths.back()), whose backward finishes the
// last layer first (deterministic on CUDA too: matmuls, adds, sums): w0 (widths[0],
// widths[1]), b0, w1, b1, ...
inline NamedParams tanh_chain(uint64_t seed, const std::vector<int64_t>& widths, c10::Device device = torch::kCPU) {
  torch::manual_seed(seed);
  NamedParams params;
  for (size_t l = 0; l + 1 < widths.size(); ++l) {
    const double init = 1.0 / std::sqrt(static_cast<double>(widths[l]));
    params.emplace_back("w" + std::to_string(l), (torch::randn({widths[l], widths[l + 1]}) * init).to(device).requires_grad_(true));
    params.emplace_back("b" + std::to_string(l), (torch::randn({widths[l + 1]}) * 0.1).to(device).requires_grad_(true));
  }
  return params;
}

// Its loss, the mean square of the output; the parameter named `unused` (a bias) takes no part.
inline torch::Tensor tanh_chain_loss(const NamedParams& params, const torch::Tensor& x, const std::string& unused = "") {
  torch::Tensor h = x;
  for (size_t i = 0; i < params.size(); i += 2) {
    h = h.matmul(params[i].second);
    if (params[i + 1].first != unused) h = h + params[i + 1].second;
    h = torch::tanh(h);
  }
  return h.pow(2).mean();
}

inline std::vector<torch::Tensor> tensors_of(const NamedParams& named) {
  std::vector<torch::Tensor> out;
  for (const auto& [name, p] : named) out.push_back(p);
  return out;
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
