// Bucketed, backward-overlapped gradient all-reduce.
#include "gpt2ft/distributed/grad_reducer.h"

#include <torch/torch.h>

#include <mutex>

#include "gpt2ft/core/error.h"
#include "gpt2ft/core/gradient_hook.h"

namespace gpt2ft {

struct GradReducer::State {
  struct Slot {
    torch::Tensor param;
    int64_t bucket = 0;
    int64_t offset = 0;  // in elements, inside the bucket
  };
  struct Bucket {
    torch::Tensor flat;    // (numel,) of the gradients' dtype, on their device
    int64_t expected = 0;  // parameters in it
    int64_t ready = 0;     // parameters copied in during this step
    bool launched = false;
    PendingCollective pending;
  };

  Communicator* comm = nullptr;
  std::vector<Slot> slots;
  std::vector<Bucket> buckets;
  std::vector<bool> copied;  // per slot, this step
  std::vector<int64_t> has_grad;  // per slot, this step: 1 when this rank computed a gradient
  int64_t next_launch = 0;
  bool armed = false;
  std::mutex mutex;

  void copy_in(size_t slot_index) {
    const Slot& s = slots[slot_index];
    Bucket& b = buckets[s.bucket];
    torch::NoGradGuard no_grad;
    torch::Tensor view = b.flat.narrow(0, s.offset, s.param.numel());
    const torch::Tensor& grad = s.param.grad();
    if (grad.defined())
      view.copy_(grad.reshape({-1}));
    else
      view.zero_();
    has_grad[slot_index] = grad.defined() ? 1 : 0;
    copied[slot_index] = true;
    ++b.ready;
  }

  void launch(Bucket& b, int64_t index) {
    b.launched = true;
    b.pending = comm->all_reduce_sum_async(b.flat, "gradient bucket " + std::to_string(index));
  }

  // Launches buckets in index order while the next one is complete.
  void launch_ready() {
    while (next_launch < static_cast<int64_t>(buckets.size())) {
      Bucket& b = buckets[next_launch];
      if (b.ready < b.expected) break;
      launch(b, next_launch++);
    }
  }

  void on_gradient(size_t slot_index) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!armed || copied[slot_index]) return;
    copy_in(slot_index);
    launch_ready();
  }
};

GradReducer::GradReducer(Communicator& comm, const std::vector<torch::Tensor>& params, int64_t bucket_bytes)
    : state_(std::make_shared<State>()) {
  state_->comm = &comm;
  for (auto it = params.rbegin(); it != params.rend(); ++it) {
    if (it->requires_grad()) params_.push_back(*it);
  }
  // Bucket boundaries: close a bucket when it reaches bucket_bytes or the dtype changes.
  int64_t bucket_elems = 0, bucket_size_bytes = 0;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  // Without process groups nothing is reduced: no buckets are allocated and no hooks set.
  const bool active = comm.active();
  auto close_bucket = [&] {
    if (bucket_elems == 0) return;
    State::Bucket b;
    if (active) b.flat = torch::zeros({bucket_elems}, params_.front().options().dtype(dtype).requires_grad(false));
    state_->buckets.push_back(std::move(b));
    bucket_elems = bucket_size_bytes = 0;
  };
  for (const auto& p : params_) {
    if (bucket_elems > 0 && (p.scalar_type() != dtype || bucket_size_bytes >= bucket_bytes)) close_bucket();
    dtype = p.scalar_type();
    state_->slots.push_back({p, static_cast<int64_t>(state_->buckets.size()), bucket_elems});
    bucket_elems += p.numel();
    bucket_size_bytes += p.numel() * static_cast<int64_t>(p.element_size());
  }
  close_bucket();
  for (const auto& s : state_->slots) ++state_->buckets[s.bucket].expected;
  state_->copied.assign(state_->slots.size(), false);
  state_->has_grad.assign(state_->slots.size(), 0);
  if (!active) return;
  for (size_t i = 0; i < state_->slots.size(); ++i) {
    set_gradient_hook(state_->slots[i].param, [weak = std::weak_ptr<State>(state_), i] {
      if (auto s = weak.lock()) s->on_gradient(i);
    });
  }
}

GradReducer::~GradReducer() {
  if (!state_->comm->active()) return;
  for (auto& s : state_->slots) clear_gradient_hook(s.param);
}

void GradReducer::arm() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->armed = true;
}

void GradReducer::finish() {
  State& st = *state_;
  if (!st.comm->active()) return;
  {
    std::lock_guard<std::mutex> lock(st.mutex);
    st.armed = false;
    for (size_t i = 0; i < st.slots.size(); ++i) {
      if (!st.copied[i]) st.copy_in(i);
    }
    st.launch_ready();
  }
  // A parameter no rank computed a gradient for keeps none, so AdamW leaves it alone as in one
  // process. Agreed on the control group: host values, no GPU synchronisation.
  const std::vector<int64_t> any_grad = st.comm->agree_max(st.has_grad, "which parameters have gradients");
  const double world = static_cast<double>(st.comm->world_size());
  torch::NoGradGuard no_grad;
  for (auto& b : st.buckets) {
    b.pending.wait();
    b.flat.div_(world);
  }
  for (size_t i = 0; i < st.slots.size(); ++i) {
    State::Slot& s = st.slots[i];
    if (any_grad[i] == 0) {
      s.param.mutable_grad().reset();
      continue;
    }
    const torch::Tensor mean = st.buckets[s.bucket].flat.narrow(0, s.offset, s.param.numel()).view(s.param.sizes());
    if (s.param.grad().defined())
      s.param.mutable_grad().copy_(mean);
    else
      s.param.mutable_grad() = mean.clone();
  }
  for (auto& b : st.buckets) b.ready = 0, b.launched = false;
  st.copied.assign(st.slots.size(), false);
  st.next_launch = 0;
}

int64_t GradReducer::num_buckets() const { return static_cast<int64_t>(state_->buckets.size()); }

int64_t GradReducer::bucket_bytes_total() const {
  int64_t total = 0;
  for (const auto& b : state_->buckets) {
    if (b.flat.defined()) total += b.flat.numel() * static_cast<int64_t>(b.flat.element_size());
  }
  return total;
}

}  // namespace gpt2ft
