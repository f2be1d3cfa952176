// The training data loader. Samples are those of data/samples.h: windows of T+1 tokens with
// stride T in each shard (an incomplete tail is dropped), or, for document shards, whole
// documents packed into rows of T positions. Each epoch visits every sample
// once in an order that depends only on (seed, epoch). The loader's position is counted in
// samples, not batches, so a run can continue with a different micro batch (or number of
// ranks) at exactly the next sample. N worker threads fill (B, T+1) host buffers (pinned on
// CUDA) ahead of the training thread, which copies them to the device without blocking.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
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
  std::string packing = "auto";       // data.packing
  std::string too_long = "truncate";  // data.too_long
  c10::Device device = c10::kCPU;
};

// Preference pairs: B examples read as 2B rows, example i's chosen in row 2i and its rejected
// in row 2i+1 (the shapes below then have 2B rows).
struct Batch {
  torch::Tensor x;               // (B, T) int64 inputs, on the device
  torch::Tensor y;               // (B, T) int64 targets (x shifted by one; kIgnoreTarget where none)
  torch::Tensor positions;       // (B, T) int64 when documents are packed (else undefined)
  torch::Tensor target_rows;     // (K) int64 indices b*T+t of the targets, for document shards (else undefined)
  int64_t num_targets = 0;       // K, or B*T
  std::vector<int64_t> samples;  // the global sample ids in the batch
  torch::Tensor sample_ids;      // (B) int64 the same ids on the device, for preference pairs (else undefined)
  // Packed documents, for variable-length attention (packed_sequence_bounds, data/samples.h):
  // (D + 1) int32 sequence starts in the B*T flattened tokens, found on the host, and the longest.
  torch::Tensor cu_seqlens;
  int64_t max_len = 0;
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
  // Document shards: a loss is normalised by target counts (see targets_in_next).
  bool has_targets() const;
  // Preference shards: each sample is a (chosen, rejected) pair read as two rows.
  bool holds_pairs() const;
  // The targets of the next `samples` samples of the single-process order from state(), over
  // all ranks: the same number on every rank, whatever the micro batch.
  int64_t targets_in_next(int64_t samples) const;
  // The data and its packing, for the log.
  std::string describe() const;

  // The global sample at `position` of `epoch`'s order (exposed for tests and resume checks).
  int64_t sample_at(int64_t epoch, int64_t position) const;

 private:
  struct Impl;
  LoaderOptions options_;
  LoaderState state_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gpt2ft
