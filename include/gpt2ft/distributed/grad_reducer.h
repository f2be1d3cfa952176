// Data-parallel gradient averaging in buckets, overlapped with backward (what PyTorch's
// DistributedDataParallel does, which libtorch's C++ API lacks).
//
// Trained parameters are grouped, in reverse registration order (roughly the order backward
// finishes them), into flat buckets of about `bucket_bytes`. During the backward of the last
// micro batch of an optimizer step (after arm()), a hook on each parameter's gradient
// accumulator copies the finished gradient into its bucket; a full bucket is all-reduced at
// once, asynchronously, while backward goes on. Buckets launch in index order on every rank,
// as collectives must. finish() launches whatever is left (an unused parameter, or a rank that
// ran out of memory and contributes zeros so the others do not hang), waits, and writes the
// average over ranks back into each .grad. Earlier micro batches accumulate locally only. A
// parameter that no rank computed a gradient for is left without one (ranks agree on that
// over the host-side control group).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "gpt2ft/distributed/communicator.h"

namespace gpt2ft {

class GradReducer {
 public:
  GradReducer(Communicator& comm, const std::vector<torch::Tensor>& params, int64_t bucket_bytes);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // The next backward is the last of the step: reduce gradients as they finish.
  void arm();
  // Launches the buckets not launched yet, waits for all, and sets each .grad to the mean
  // over ranks. After an error inside backward, call it anyway (zero_grad first): every rank
  // must issue the same collectives.
  void finish();

  int64_t num_buckets() const;
  int64_t bucket_bytes_total() const;  // 0 without process groups (nothing is allocated)

 private:
  struct State;  // shared with the gradient hooks
  std::shared_ptr<State> state_;
  std::vector<torch::Tensor> params_;
};

}  // namespace gpt2ft
