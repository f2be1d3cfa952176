// AdamW on the host, fed bucket by bucket as backward finishes the gradients.
#include "gpt2ft/optim/offloaded_adamw.h"

#include "gpt2ft/optim/adamw_8bit.h"

#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <optional>

#include "gpt2ft/core/error.h"
#include "gpt2ft/core/gradient_hook.h"
#include "gpt2ft/core/host_memory.h"
#include "gpt2ft/core/pinned_buffers.h"

namespace gpt2ft {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

}  // namespace

struct OffloadedAdamW::State {
  struct Bucket {
    std::vector<size_t> members;   // indices into params
    std::vector<int64_t> offsets;  // of each member in host_grads
    torch::Tensor host_grads;      // (numel,) float32, pinned on CUDA
    std::vector<torch::Tensor> copies;    // the members' host copies (float32 weights), by member position
    std::unique_ptr<Optimizer> adamw;     // over them: AdamW, or AdamW8bit
    // This step:
    std::vector<bool> finished;  // by member: backward finished its gradient (armed only)
    size_t num_finished = 0;
    bool sent = false;        // its gradients are on their way to host_grads
    bool sent_early = false;  // sent during backward: not unscaled or clipped yet
    std::optional<c10::Event> copied;  // CUDA: recorded after its copies

    torch::Tensor& host_copy(size_t j) { return copies[j]; }
  };

  explicit State(c10::Device d) : device(d), cuda(d.is_cuda()) {}

  bool eight_bit = false;  // the buckets' optimizers are AdamW8bit
  bool quantize_embeddings = false;  // theirs (AdamWOptions)

  const c10::Device device;
  const bool cuda;
  std::optional<c10::impl::VirtualGuardImpl> impl;  // CUDA
  std::optional<c10::Stream> copy_stream;            // CUDA: one for every copy, so they run in order
  std::vector<std::pair<std::string, torch::Tensor>> params;  // on the device
  std::vector<std::pair<size_t, size_t>> place;                // by parameter: (bucket, member)
  std::vector<Bucket> buckets;
  bool hooks = false;
  std::mutex mutex;  // armed and the buckets' per-step flags (hooks run on autograd's threads)
  bool armed = false;
  TransferObserver observer;
  int64_t sent_in_backward = 0, sent_at_step = 0;  // over the run
  // Per step taken: ms waiting for gradients to arrive, and ms in the host AdamW kernel.
  std::vector<double> waiting_ms, adamw_ms;

  // Queues the copy of bucket i's gradients, as the current stream leaves them, to the host.
  void send(size_t i, bool during_backward) {
    Bucket& b = buckets[i];
    torch::NoGradGuard no_grad;
    std::optional<c10::StreamGuard> on_copy;
    if (cuda) {
      c10::Event ready(device.type());
      ready.record(impl->getStream(device));
      ready.block(*copy_stream);
      on_copy.emplace(*copy_stream);
    }
    for (size_t k = 0; k < b.members.size(); ++k) {
      const torch::Tensor& grad = params[b.members[k]].second.grad();
      if (!grad.defined()) continue;
      b.host_grads.narrow(0, b.offsets[k], grad.numel()).copy_(grad.reshape({-1}), /*non_blocking=*/cuda);
    }
    if (cuda) {
      b.copied.emplace(device.type());
      b.copied->record(*copy_stream);
    }
    b.sent = true;
    b.sent_early = during_backward;
    ++(during_backward ? sent_in_backward : sent_at_step);
    if (observer) observer(i, during_backward);
  }

  // Autograd accumulated parameter p's gradient.
  void on_gradient(size_t p) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!armed) return;
    const auto [i, j] = place[p];
    Bucket& b = buckets[i];
    if (b.sent || b.finished[j]) return;
    b.finished[j] = true;
    if (++b.num_finished == b.members.size()) send(i, /*during_backward=*/true);
  }

  void start_step() {
    for (auto& b : buckets) {
      b.finished.assign(b.members.size(), false);
      b.num_finished = 0;
      b.sent = b.sent_early = false;
      b.copied.reset();
    }
  }
};

void check_host_memory_for_offload(int64_t trained_parameters, bool eight_bit) {
  require_host_memory((eight_bit ? 10.0 : 16.0) * static_cast<double>(trained_parameters),
                      "train.optimizer_offload \"cpu\" for " + std::to_string(trained_parameters) +
                          (eight_bit ? " trained parameters (about 10 bytes each: a float32 copy, the 8-bit moments "
                                       "and the gradient buffer)"
                                     : " trained parameters (16 bytes each: a float32 copy, AdamW's two moments and "
                                       "the gradient buffer)"),
                      "free host memory, shard the optimizer over GPUs (distributed.shard_optimizer) or set "
                      "train.optimizer_offload \"none\"");
}

OffloadedAdamW::OffloadedAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
                               AdamWOptions options, c10::Device device, int64_t bucket_bytes, bool take_in_backward,
                               bool eight_bit)
    : state_(std::make_shared<State>(device)) {
  State& st = *state_;
  for (auto it = named_params.rbegin(); it != named_params.rend(); ++it) {  // backward's order, roughly
    if (it->second.requires_grad()) st.params.push_back(*it);
  }
  int64_t trained = 0;
  for (const auto& [name, p] : st.params) trained += p.numel();
  check_host_memory_for_offload(trained, eight_bit);
  st.eight_bit = eight_bit;
  st.quantize_embeddings = options.quantize_embeddings;
  if (st.cuda) {
    st.impl.emplace(device.type());
    st.copy_stream = st.impl->getStreamFromGlobalPool(device, /*isHighPriority=*/false);
  }
  options.fused = true;  // the host kernel: vectorised and multi-threaded
  torch::NoGradGuard no_grad;
  st.place.resize(st.params.size());
  for (size_t i = 0; i < st.params.size();) {  // consecutive parameters, about bucket_bytes each
    State::Bucket b;
    int64_t numel = 0;
    while (i < st.params.size() && (b.members.empty() || 4 * numel < bucket_bytes)) {
      st.place[i] = {st.buckets.size(), b.members.size()};
      b.offsets.push_back(numel);
      numel += st.params[i].second.numel();
      b.members.push_back(i++);
    }
    // One locked block a bucket: its gradients, then a copy of each member's weights.
    std::vector<std::vector<int64_t>> shapes = {{numel}};
    for (const size_t m : b.members) shapes.push_back(st.params[m].second.sizes().vec());
    const std::vector<torch::Tensor> block = host_float_buffers(shapes, /*pin=*/st.cuda);
    b.host_grads = block[0];
    std::vector<std::pair<std::string, torch::Tensor>> copies;
    for (size_t j = 0; j < b.members.size(); ++j) {
      b.copies.push_back(block[1 + j].requires_grad_(true));
      copies.emplace_back(st.params[b.members[j]].first, b.copies.back());
    }
    if (eight_bit) {
      b.adamw = std::make_unique<AdamW8bit>(copies, options);  // its fused CPU kernel
    } else {
      b.adamw = std::make_unique<AdamW>(copies, options);
    }
    st.buckets.push_back(std::move(b));
  }
  st.start_step();
  refresh_host_weights();
  if (!take_in_backward) return;
  st.hooks = true;
  for (size_t p = 0; p < st.params.size(); ++p) {
    set_gradient_hook(st.params[p].second, [weak = std::weak_ptr<State>(state_), p] {
      if (auto s = weak.lock()) s->on_gradient(p);
    });
  }
}

OffloadedAdamW::~OffloadedAdamW() {
  State& st = *state_;
  if (st.hooks) {
    for (auto& [name, p] : st.params) clear_gradient_hook(p);
  }
  if (st.copy_stream) st.copy_stream->synchronize();  // nothing in flight into freed host buffers
}

void OffloadedAdamW::refresh_host_weights() {
  torch::NoGradGuard no_grad;
  for (auto& b : state_->buckets) {
    for (size_t j = 0; j < b.members.size(); ++j) b.host_copy(j).copy_(state_->params[b.members[j]].second);
  }
}

void OffloadedAdamW::begin_last_backward() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->start_step();
  state_->armed = state_->hooks;
}

void OffloadedAdamW::end_backward() {
  State& st = *state_;
  std::lock_guard<std::mutex> lock(st.mutex);
  st.armed = false;
  if (!st.cuda) return;
  // What comes next on the compute stream (unscaling, clipping, freeing) waits for the copies.
  c10::Event sent(st.device.type());
  sent.record(*st.copy_stream);
  sent.block(st.impl->getStream(st.device));
}

void OffloadedAdamW::step(double lr, const GradientScaling& scaling) {
  torch::NoGradGuard no_grad;
  State& st = *state_;
  std::lock_guard<std::mutex> lock(st.mutex);
  st.armed = false;
  // A skipped step (float16) reads the flag once.
  if (!scaling.found_inf || scaling.found_inf->item<float>() == 0.0f) {
    for (size_t i = 0; i < st.buckets.size(); ++i) {
      if (!st.buckets[i].sent) st.send(i, /*during_backward=*/false);
    }
    // What the device gradients were multiplied by since backward, as () host tensors: read
    // (a wait for the compute stream) only when some bucket went before that.
    std::optional<torch::Tensor> inv_scale, clip_coef;
    if (std::any_of(st.buckets.begin(), st.buckets.end(), [](const State::Bucket& b) { return b.sent_early; })) {
      if (scaling.inv_scale) inv_scale = scaling.inv_scale->to(torch::kCPU);
      if (scaling.clip_coef) clip_coef = scaling.clip_coef->to(torch::kCPU);
    }
    double waiting = 0, adamw = 0;
    for (auto& b : st.buckets) {  // as each bucket's gradients arrive
      const auto t0 = Clock::now();
      if (b.copied) b.copied->synchronize();
      const auto t1 = Clock::now();
      waiting += ms_between(t0, t1);
      if (b.sent_early) {  // the same float32 products as on the device, in the same order
        if (inv_scale) b.host_grads.mul_(*inv_scale);
        if (clip_coef) b.host_grads.mul_(*clip_coef);
      }
      for (size_t j = 0; j < b.members.size(); ++j) {
        const torch::Tensor& p = st.params[b.members[j]].second;
        // A parameter without a gradient this step has none on the host either (AdamW skips it).
        torch::Tensor& host_grad = b.host_copy(j).mutable_grad();
        if (p.grad().defined()) host_grad = b.host_grads.narrow(0, b.offsets[j], p.numel()).view(p.sizes());
        else host_grad.reset();
      }
      const auto t2 = Clock::now();
      b.adamw->step(lr);
      adamw += ms_between(t2, Clock::now());
      std::optional<c10::StreamGuard> on_copy;
      if (st.cuda) on_copy.emplace(*st.copy_stream);
      for (size_t j = 0; j < b.members.size(); ++j) {
        st.params[b.members[j]].second.copy_(b.host_copy(j), /*non_blocking=*/st.cuda);
      }
    }
    st.waiting_ms.push_back(waiting);
    st.adamw_ms.push_back(adamw);
    if (st.cuda) {  // the next forward pass reads the updated weights
      c10::Event weights_back(st.device.type());
      weights_back.record(*st.copy_stream);
      weights_back.block(st.impl->getStream(st.device));
    }
  }
  st.start_step();
}

NamedTensors OffloadedAdamW::state_layout(const std::string& name, const torch::Tensor& param) const {
  return state_->eight_bit ? adamw_8bit_state_layout(name, param, state_->quantize_embeddings)
                           : adamw_state_layout(name, param);
}

NamedTensors OffloadedAdamW::checkpoint_state() const {
  NamedTensors out;
  for (const auto& b : state_->buckets) {
    for (auto& item : b.adamw->checkpoint_state()) out.push_back(std::move(item));
  }
  return out;
}

void OffloadedAdamW::restore_state(const SafetensorsReader& state) {
  for (auto& b : state_->buckets) b.adamw->restore_state(state);
  refresh_host_weights();
}

int64_t OffloadedAdamW::host_bytes() const {
  int64_t bytes = 0;
  for (const auto& b : state_->buckets) {
    bytes += b.host_grads.nbytes();
    for (const auto& [key, t] : b.adamw->checkpoint_state()) bytes += t.nbytes();
    for (const auto& c : b.copies) bytes += c.nbytes();
  }
  return bytes;
}

std::vector<std::vector<std::string>> OffloadedAdamW::bucket_names() const {
  std::vector<std::vector<std::string>> out;
  for (const auto& b : state_->buckets) {
    out.emplace_back();
    for (const size_t m : b.members) out.back().push_back(state_->params[m].first);
  }
  return out;
}

std::string OffloadedAdamW::run_report() const {
  const State& st = *state_;
  std::lock_guard<std::mutex> lock(state_->mutex);
  std::string report = fmt::format(
      "optimizer offload: {} gradient bucket(s) a step; sent to the host {} time(s) during backward, {} at the step",
      st.buckets.size(), st.sent_in_backward, st.sent_at_step);
  if (!st.adamw_ms.empty()) {
    report += fmt::format("; in the step (median of {}): {:.1f} ms waiting for gradients, {:.1f} ms host AdamW",
                          st.adamw_ms.size(), median(st.waiting_ms), median(st.adamw_ms));
  }
  return report;
}

void OffloadedAdamW::observe_transfers(TransferObserver observer) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->observer = std::move(observer);
}

}  // namespace gpt2ft
