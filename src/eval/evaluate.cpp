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
#include "gpt2ft/data/samples.h"
#include "gpt2ft/data/shard.h"

namespace gpt2ft {
namespace {

// The summed loss (double, on the device) of a batch (rows, R, T) on the host: rows x, y
// (kIgnoreTarget where no target) and, packed, positions. In forward passes of at most
// `per_pass` windows; out of memory halves `per_pass` (down to 1) and goes on. The target rows
// are found on the host, as the loader does, so no pass waits for the device to count them.
torch::Tensor batch_loss_sum(GPT2& model, const torch::Tensor& host_batch, bool has_targets, int64_t& per_pass,
                             const EvalOptions& options, c10::Device device) {
  const torch::Tensor batch = host_batch.to(device);
  const int64_t rows = batch.size(0);
  torch::Tensor sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  for (int64_t at = 0; at < rows;) {
    const int64_t n = std::min(per_pass, rows - at);
    const torch::Tensor part = batch.narrow(0, at, n);               // (n, R, T)
    const torch::Tensor x = part.select(1, 0), y = part.select(1, 1);  // (n, T)
    LossTargets which;
    if (part.size(1) == 3) {
      which.positions = part.select(1, 2);
      if (model->packed_attention() == PackedAttention::kVarlen) {  // the sequences, found here on the host
        const torch::Tensor host = host_batch.narrow(0, at, n).contiguous();  // (n, 3, T)
        const int64_t T = host.size(2);
        torch::Tensor starts = torch::empty({n * T + 1}, torch::kInt);
        const int64_t D = packed_sequence_bounds(host.data_ptr<int64_t>() + 2 * T, host.data_ptr<int64_t>() + T, n, T,
                                                 3 * T, starts.data_ptr<int32_t>(), which.bounds.max_len);
        which.bounds.cu_seqlens = starts.narrow(0, 0, D + 1).to(device);  // (D + 1)
      }
    }
    if (has_targets) {
      const torch::Tensor host_y = host_batch.narrow(0, at, n).select(1, 1);  // (n, T)
      which.target_rows = host_y.reshape({-1}).ne(kIgnoreTarget).nonzero().squeeze(1).to(device);  // (K)
    }
    which.divisor = 1;  // the sum
    try {
      AutocastGuard autocast(device.type(), options.amp_dtype);
      maybe_inject_oom(n);
      sum += model->forward_loss(x, y, which).to(torch::kDouble);  // () float32, summed over the targets
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
  SampleOptions sample_options;
  sample_options.seq_len = T;
  sample_options.packing = options.packing;
  sample_options.too_long = options.too_long;
  sample_options.vocab_size = config.vocab_size;
  sample_options.what = options.what;
  const Samples samples(shards, sample_options);
  if (samples.packing() == Packing::kPairs) {
    throw Error(options.what + ": " + describe_files(shards) + " are preference shards (chosen/rejected pairs); this "
                "evaluation is a language-model loss over documents. Their DPO loss and reward accuracy are what "
                "`gpt2-finetune eval --reference BASE_MODEL` reports, and train for data.val under train.objective "
                "\"dpo\"");
  }
  if (samples.size() == 0) {
    throw Error(describe_files(shards) + ": no sample of seq_len+1 = " + std::to_string(T + 1) +
                " tokens in these shards; use a smaller sequence length or more data");
  }

  const int64_t B = options.batch_size;
  int64_t num_windows = samples.size();
  if (options.max_sequences > 0) num_windows = std::min(num_windows, options.max_sequences);
  const int64_t num_batches = (num_windows + B - 1) / B;

  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  torch::Tensor loss_sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  int64_t tokens = 0;
  int64_t per_pass = options.max_forward_batch > 0 ? std::min(B, options.max_forward_batch) : B;  // halved on OOM
  const int64_t R = samples.packing() == Packing::kDocuments ? 3 : 2;
  torch::Tensor host = torch::empty({B, R, T}, torch::kLong);  // (B, R, T) x, y, positions
  const int64_t rank = options.comm ? options.comm->rank() : 0;
  const int64_t ranks = options.comm ? options.comm->world_size() : 1;
  for (int64_t b = rank; b < num_batches; b += ranks) {
    const int64_t rows = std::min<int64_t>(B, num_windows - b * B);
    int64_t* data = host.data_ptr<int64_t>();
    for (int64_t i = 0; i < rows; ++i) {
      int64_t* row = data + i * R * T;
      tokens += samples.read(b * B + i, row, row + T, R == 3 ? row + 2 * T : nullptr);
    }
    loss_sum += batch_loss_sum(model, host.narrow(0, 0, rows), samples.has_targets(), per_pass,
                               options, device);  // read once, below
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

  if (tokens == 0) {
    throw Error(describe_files(shards) + ": no target token in the " + std::to_string(num_windows) +
                " sequences evaluated (every completion cut off by the sequence length?)");
  }
  EvalResult result;
  result.tokens = tokens;
  result.sequences = num_windows;
  result.batches = num_batches;
  result.forward_batch = per_pass;
  result.loss = loss / static_cast<double>(tokens);
  result.perplexity = std::exp(result.loss);
  return result;
}

}  // namespace gpt2ft
