// The training data loader. Samples are windows of T+1 tokens with stride T in each shard
// (window k = tokens kT..kT+T; an incomplete tail is dropped). Each epoch visits every sample
// once in an order that depends only on (seed, epoch). The loader's position is counted in
// samples, not batches, so a run can continue with a different micro batch (or number of
// ranks) at exactly the next sample. N worker threads fill (B, T+1) host buffers (pinned on
// CUDA) ahead of the training thread, which copies them to the device without blocking.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <vector>

#include <c10/core/Device.h>
#include <torch/types.h>

namespace gpt2ft {

// Where the loader stands: `consumed` samples of epoch `epoch` have been handed out.
struct LoaderState {
  int64_t epoch = 0;
  int64_t consumed = 0;
  bool operator==(const LoaderState& o) const { return epoch == o.epoch && consumed == o.consumed; }
};

struct LoaderOptions {
  std::vector<std::filesystem::path> shards;
  int64_t seq_len = 1024;      // T
  int64_t micro_batch = 8;     // B, samples per rank per call
  uint64_t seed = 1337;
  bool shuffle = true;         // false: samples in shard order every epoch
  int num_workers = 2;
  int prefetch = 4;            // batches prepared ahead
  int rank = 0;                // ranks together consume the single-process order:
  int world_size = 1;          // each call takes the next world_size*B samples, rank r the r-th B
  int64_t vocab_size = 0;      // when > 0, token ids >= vocab_size are errors
  c10::Device device = c10::kCPU;
};

struct Batch {
  torch::Tensor x;               // (B, T) int64 inputs, on the device
  torch::Tensor y;               // (B, T) int64 targets (x shifted by one)
  std::vector<int64_t> samples;  // the global sample ids in the batch
  LoaderState state_after;       // the loader's state once this batch is consumed
};

class DataLoader {
 public:
  DataLoader(LoaderOptions options, LoaderState start = {});
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  // The next batch for this rank. A worker's error is rethrown here with its message.
  Batch next();
  // The state after the last batch next() returned (the start state before any).
  LoaderState state() const { return state_; }
  // Drops prefetched batches and continues from `state` with a new micro batch.
  void restart(LoaderState state, int64_t micro_batch);
  int64_t samples_per_epoch() const;
  int64_t micro_batch() const { return options_.micro_batch; }

  // The global sample at `position` of `epoch`'s order (exposed for tests and resume checks).
  int64_t sample_at(int64_t epoch, int64_t position) const;

 private:
  struct Impl;
  LoaderOptions options_;
  LoaderState state_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gpt2ft
