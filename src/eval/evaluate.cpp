// Evaluation loop.
#include "gpt2ft/eval/evaluate.h"

#include <cmath>
#include <memory>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/fault_injection.h"
#include "gpt2ft/core/out_of_memory.h"
#include "gpt2ft/data/shard.h"

namespace gpt2ft {
namespace {

struct Window {
  const ShardReader* shard;
  int64_t begin;
};

// The shards, opened, and their windows of T+1 tokens at stride T (incomplete tails dropped).
struct Windows {
  std::vector<std::unique_ptr<ShardReader>> readers;
  std::vector<Window> list;
};

// Every id is checked against the vocabulary once, when a shard is opened.
Windows windows_of(const std::vector<std::filesystem::path>& shards, int64_t T, int64_t vocab_size) {
  Windows w;
  for (const auto& path : shards) {
    w.readers.push_back(std::make_unique<ShardReader>(path));
    w.readers.back()->check_ids(vocab_size);
    const ShardReader& r = *w.readers.back();
    const int64_t count = r.num_tokens() > T ? (r.num_tokens() - 1) / T : 0;
    for (int64_t k = 0; k < count; ++k) w.list.push_back({&r, k * T});
  }
  if (w.list.empty()) {
    throw Error(describe_files(shards) + ": no complete window of seq_len+1 = " + std::to_string(T + 1) +
                " tokens in these shards; use a smaller --seq-len or more data");
  }
  return w;
}

// Reads `rows` windows from `first` into host (B, T+1).
void read_windows(const std::vector<Window>& windows, int64_t first, int64_t rows, int64_t T, torch::Tensor& host) {
  int64_t* data = host.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) windows[first + i].shard->read(windows[first + i].begin, T + 1, data + i * (T + 1));
}

// The summed loss (double, on the device) of a batch (rows, T+1), in forward passes of at
// most `per_pass` windows; out of memory halves `per_pass` (down to 1) and goes on.
torch::Tensor batch_loss_sum(GPT2& model, const torch::Tensor& batch, int64_t& per_pass, const EvalOptions& options,
                             c10::Device device) {
  const int64_t rows = batch.size(0), T = options.seq_len;
  torch::Tensor sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  for (int64_t at = 0; at < rows;) {
    const int64_t n = std::min(per_pass, rows - at);
    const torch::Tensor x = batch.narrow(0, at, n).narrow(1, 0, T), y = batch.narrow(0, at, n).narrow(1, 1, T);  // (n, T)
    try {
      AutocastGuard autocast(device.type(), options.amp_dtype);
      maybe_inject_oom(n);
      const torch::Tensor mean = model->forward_loss(x, y);  // () float32, mean over n*T tokens
      sum += mean.to(torch::kDouble) * static_cast<double>(n * T);
      at += n;
    } catch (const std::exception& e) {
      if (!is_out_of_memory(e) || per_pass == 1) throw;
      release_cached_memory(device);
      per_pass = std::max<int64_t>(1, per_pass / 2);
      spdlog::warn("OUT OF MEMORY during evaluation with {} windows per forward pass ({}): continuing with {} "
                   "(the training micro batch is unchanged)",
                   n, describe_exception(e), per_pass);
    }
  }
  return sum;
}

}  // namespace

EvalResult evaluate(GPT2& model, const std::vector<std::filesystem::path>& shards,
                    const EvalOptions& options, c10::Device device) {
  const GPT2Config& config = model->config();
  const int64_t T = options.seq_len;
  if (T < 1) throw Error("--seq-len: expected an integer >= 1, got " + std::to_string(T));
  if (T > config.n_positions) {
    throw Error("--seq-len " + std::to_string(T) + " exceeds the model's n_positions (" +
                std::to_string(config.n_positions) + ")");
  }
  if (options.batch_size < 1) throw Error("--batch-size: expected an integer >= 1");
  const Windows windows = windows_of(shards, T, config.vocab_size);

  const int64_t B = options.batch_size;
  int64_t num_windows = static_cast<int64_t>(windows.list.size());
  if (options.max_sequences > 0) num_windows = std::min(num_windows, options.max_sequences);
  const int64_t num_batches = (num_windows + B - 1) / B;

  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  torch::Tensor loss_sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  int64_t tokens = 0;
  int64_t per_pass = options.max_forward_batch > 0 ? std::min(B, options.max_forward_batch) : B;  // halved on OOM
  torch::Tensor host = torch::empty({B, T + 1}, torch::kLong);  // (B, T+1)
  const int64_t rank = options.comm ? options.comm->rank() : 0;
  const int64_t ranks = options.comm ? options.comm->world_size() : 1;
  for (int64_t b = rank; b < num_batches; b += ranks) {
    const int64_t rows = std::min<int64_t>(B, num_windows - b * B);
    read_windows(windows.list, b * B, rows, T, host);
    loss_sum += batch_loss_sum(model, host.narrow(0, 0, rows).to(device), per_pass, options, device);  // read once, below
    tokens += rows * T;
  }
  if (was_training) model->train();
  double loss = 0;
  if (ranks > 1) {
    const std::vector<double> sums = options.comm->reduce_device_scalars(
        {loss_sum, torch::tensor(static_cast<double>(tokens), torch::kDouble)}, HostReduce::sum, "validation loss");
    loss = sums[0];
    tokens = static_cast<int64_t>(sums[1]);
  } else {
    loss = loss_sum.item<double>();
  }

  EvalResult result;
  result.tokens = tokens;
  result.batches = num_batches;
  result.forward_batch = per_pass;
  result.loss = loss / static_cast<double>(tokens);
  result.perplexity = std::exp(result.loss);
  return result;
}

}  // namespace gpt2ft
