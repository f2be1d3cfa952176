// Multi-worker, order-deterministic data loader.
#include "gpt2ft/data/loader.h"

#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include <torch/torch.h>

#include "gpt2ft/core/error.h"
#include "gpt2ft/data/samples.h"
#include "gpt2ft/data/shard.h"

namespace gpt2ft {
namespace {

// splitmix64 stream with Lemire's unbiased bounded draw: the same permutation on every
// platform and compiler (std:: distributions are implementation-defined).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) {
    __uint128_t m = static_cast<__uint128_t>(next()) * n;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < n) {
      const uint64_t threshold = (0 - n) % n;
      while (low < threshold) {
        m = static_cast<__uint128_t>(next()) * n;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

 private:
  uint64_t state_;
};

}  // namespace

struct DataLoader::Impl {
  struct Slot {
    torch::Tensor host;  // (B*S, R, T) int64, rows x, y (and positions when packed); pinned on CUDA
    torch::Tensor rows;  // (B*S*T) int64, the targets' indices (document shards); pinned on CUDA
    torch::Tensor ids;   // (B) int64, the samples' ids (preference pairs); pinned on CUDA
    torch::Tensor cu_seqlens;  // (B*S*T + 1) int32, packed rows' sequence starts (D + 1 used); pinned on CUDA
    int64_t num_sequences = 0, max_len = 0;
    int64_t num_targets = 0;
    std::vector<int64_t> samples;
    bool ready = false;
    std::exception_ptr error;
  };

  const LoaderOptions& opt;
  Samples index;
  std::mutex order_mutex;
  std::map<int64_t, std::shared_ptr<const std::vector<uint32_t>>> orders;

  std::mutex mutex;
  std::condition_variable cv;
  std::vector<Slot> slots;
  int64_t start = 0;          // global position of the first sample after (re)start
  int64_t next_to_fill = 0;   // batch counters since (re)start
  int64_t next_to_take = 0;
  int64_t released = 0;       // batches < released have given their slot back
  int64_t in_use = -1;        // batch whose device copy may still read its slot
  std::optional<c10::Event> copy_done;
  bool stop = false;
  std::vector<std::thread> workers;

  Impl(const LoaderOptions& o) : opt(o), index(o.shards, sample_options(o)) {}

  static SampleOptions sample_options(const LoaderOptions& o) {
    SampleOptions s;
    s.seq_len = o.seq_len;
    s.packing = o.packing;
    s.too_long = o.too_long;
    s.vocab_size = o.vocab_size;
    return s;
  }
  int64_t rows_per_sample() const { return index.packing() == Packing::kDocuments ? 3 : 2; }

  std::shared_ptr<const std::vector<uint32_t>> order(int64_t epoch) {
    std::lock_guard<std::mutex> lock(order_mutex);
    auto it = orders.find(epoch);
    if (it != orders.end()) return it->second;
    auto perm = std::make_shared<std::vector<uint32_t>>(static_cast<size_t>(index.size()));
    for (size_t i = 0; i < perm->size(); ++i) (*perm)[i] = static_cast<uint32_t>(i);
    SplitMix64 rng(opt.seed * 0x9E3779B97F4A7C15ull ^ (static_cast<uint64_t>(epoch) + 1) * 0xD1B54A32D192ED03ull);
    for (size_t i = perm->size(); i > 1; --i) std::swap((*perm)[i - 1], (*perm)[rng.below(i)]);
    while (orders.size() >= 3) orders.erase(orders.begin());  // batches span at most two epochs
    orders.emplace(epoch, perm);
    return perm;
  }

  int64_t sample_at(int64_t global_position) {
    const int64_t S = index.size();
    const int64_t epoch = global_position / S, pos = global_position % S;
    return opt.shuffle ? static_cast<int64_t>((*order(epoch))[static_cast<size_t>(pos)]) : pos;
  }

  void fill(Slot& slot, int64_t batch) {
    const int64_t B = opt.micro_batch, T = opt.seq_len;
    const int64_t first = start + batch * opt.world_size * B + opt.rank * B;
    const int64_t R = rows_per_sample(), S = index.sequences_per_sample();
    slot.samples.resize(static_cast<size_t>(B));
    int64_t* dst = slot.host.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      const int64_t sample = slot.samples[static_cast<size_t>(i)] = sample_at(first + i);
      if (S == 2) slot.ids.data_ptr<int64_t>()[i] = sample;
      for (int64_t j = 0; j < S; ++j) {  // a pair's sides are rows 2i and 2i+1
        int64_t* row = dst + (i * S + j) * R * T;
        if (S == 2) index.read_pair(sample, static_cast<int>(j), row, row + T);
        else index.read(sample, row, row + T, R == 3 ? row + 2 * T : nullptr);
      }
    }
    slot.num_targets = B * S * T;
    if (R == 3) {
      slot.num_sequences = packed_sequence_bounds(dst + 2 * T, dst + T, B * S, T, R * T,
                                                  slot.cu_seqlens.data_ptr<int32_t>(), slot.max_len);
    }
    if (!index.has_targets()) return;
    int64_t* rows = slot.rows.data_ptr<int64_t>();
    int64_t k = 0;
    for (int64_t i = 0; i < B * S; ++i) {
      const int64_t* y = dst + i * R * T + T;
      for (int64_t t = 0; t < T; ++t) {
        if (y[t] != kIgnoreTarget) rows[k++] = i * T + t;
      }
    }
    slot.num_targets = k;
  }
  void worker_loop() {
    const int64_t P = static_cast<int64_t>(slots.size());
    for (;;) {
      std::unique_lock<std::mutex> lock(mutex);
      cv.wait(lock, [&] { return stop || next_to_fill < released + P; });
      if (stop) return;
      const int64_t batch = next_to_fill++;
      Slot& slot = slots[static_cast<size_t>(batch % P)];
      lock.unlock();
      std::exception_ptr error;
      try {
        fill(slot, batch);
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      slot.error = error;
      slot.ready = true;
      cv.notify_all();
    }
  }

  void start_workers(int64_t global_start) {
    start = global_start;
    next_to_fill = next_to_take = released = 0;
    in_use = -1;
    copy_done.reset();
    stop = false;
    const bool pin = opt.device.is_cuda();
    slots.clear();
    slots.resize(static_cast<size_t>(std::max(2, opt.prefetch)));
    const auto options = torch::TensorOptions().dtype(torch::kLong).pinned_memory(pin);
    for (auto& s : slots) {
      const int64_t sequences = opt.micro_batch * index.sequences_per_sample();
      s.host = torch::empty({sequences, rows_per_sample(), opt.seq_len}, options);
      if (index.has_targets()) s.rows = torch::empty({sequences * opt.seq_len}, options);
      if (index.packing() == Packing::kPairs) s.ids = torch::empty({opt.micro_batch}, options);
      if (rows_per_sample() == 3) s.cu_seqlens = torch::empty({sequences * opt.seq_len + 1}, options.dtype(torch::kInt));
    }
    for (int i = 0; i < std::max(1, opt.num_workers); ++i) workers.emplace_back([this] { worker_loop(); });
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
    }
    cv.notify_all();
    for (auto& t : workers) t.join();
    workers.clear();
    if (copy_done) copy_done->synchronize();
  }

  void release_in_use() {
    if (in_use < 0) return;
    if (copy_done) copy_done->synchronize();  // the async copy out of the slot has finished
    std::lock_guard<std::mutex> lock(mutex);
    slots[static_cast<size_t>(in_use % static_cast<int64_t>(slots.size()))].ready = false;
    released = in_use + 1;
    in_use = -1;
    cv.notify_all();
  }
};

DataLoader::DataLoader(LoaderOptions options, LoaderState start) : options_(std::move(options)), state_(start) {
  if (options_.shards.empty()) throw Error("data loader: no shards given");
  if (options_.seq_len < 1) throw Error("data loader: seq_len must be >= 1");
  if (options_.micro_batch < 1) throw Error("data loader: micro batch must be >= 1");
  if (options_.world_size < 1 || options_.rank < 0 || options_.rank >= options_.world_size) {
    throw Error("data loader: rank " + std::to_string(options_.rank) + " is outside world size " +
                std::to_string(options_.world_size));
  }
  impl_ = std::make_unique<Impl>(options_);
  if (impl_->index.size() == 0) {
    throw Error(describe_files(options_.shards) +
                (impl_->index.packing() == Packing::kDocuments
                     ? std::string(": no document of two tokens or more in these shards; use more data")
                     : ": no complete sample of seq_len+1 = " + std::to_string(options_.seq_len + 1) +
                           " tokens in these shards; use a shorter data.seq_len or more data"));
  }
  if (impl_->index.size() > 0xFFFFFFFFll) throw Error("data loader: more than 2^32 samples per epoch are not supported");
  if (start.epoch < 0 || start.epoch > (1ll << 30) || start.consumed < 0 || start.consumed > impl_->index.size()) {
    throw Error("loader position epoch " + std::to_string(start.epoch) + ", sample " + std::to_string(start.consumed) +
                " is outside the data (" + std::to_string(impl_->index.size()) +
                " samples an epoch); the position belongs to other shards or is damaged");
  }
  impl_->start_workers(start.epoch * impl_->index.size() + start.consumed);
}

DataLoader::~DataLoader() { impl_->stop_workers(); }

int64_t DataLoader::samples_per_epoch() const { return impl_->index.size(); }

bool DataLoader::has_targets() const { return impl_->index.has_targets(); }
bool DataLoader::holds_pairs() const { return impl_->index.packing() == Packing::kPairs; }

std::string DataLoader::describe() const { return impl_->index.describe(); }

int64_t DataLoader::targets_in_next(int64_t samples) const {
  const Samples& index = impl_->index;
  if (!index.has_targets()) return samples * options_.seq_len;
  const int64_t start = state_.epoch * index.size() + state_.consumed;
  int64_t total = 0;
  for (int64_t i = 0; i < samples; ++i) total += index.targets(impl_->sample_at(start + i));
  return total;
}

int64_t DataLoader::sample_at(int64_t epoch, int64_t position) const {
  return impl_->sample_at(epoch * impl_->index.size() + position);
}

Batch DataLoader::next() {
  Impl& m = *impl_;
  m.release_in_use();
  const int64_t P = static_cast<int64_t>(m.slots.size());
  std::unique_lock<std::mutex> lock(m.mutex);
  Impl::Slot& slot = m.slots[static_cast<size_t>(m.next_to_take % P)];
  m.cv.wait(lock, [&] { return slot.ready; });
  if (slot.error) std::rethrow_exception(slot.error);  // the slot stays failed: later calls fail too
  const int64_t batch = m.next_to_take++;
  lock.unlock();

  Batch out;
  out.samples = slot.samples;
  out.num_targets = slot.num_targets;
  torch::Tensor tokens;  // (B*S, R, T): S sequences a sample (2 for a preference pair)
  torch::Tensor rows = slot.rows.defined() ? slot.rows.narrow(0, 0, slot.num_targets) : torch::Tensor();  // (K)
  torch::Tensor ids = slot.ids;  // (B) or undefined
  torch::Tensor bounds = slot.cu_seqlens.defined() ? slot.cu_seqlens.narrow(0, 0, slot.num_sequences + 1)
                                                   : torch::Tensor();  // (D + 1) or undefined
  if (options_.device.is_cpu()) {
    tokens = slot.host.clone();
    if (rows.defined()) rows = rows.clone();
    if (ids.defined()) ids = ids.clone();
    if (bounds.defined()) bounds = bounds.clone();
    m.in_use = batch;
    m.release_in_use();
  } else {
    tokens = slot.host.to(options_.device, /*non_blocking=*/true);
    if (rows.defined()) rows = rows.to(options_.device, /*non_blocking=*/true);
    if (ids.defined()) ids = ids.to(options_.device, /*non_blocking=*/true);
    if (bounds.defined()) bounds = bounds.to(options_.device, /*non_blocking=*/true);
    m.copy_done.emplace(options_.device.type());
    m.copy_done->record(c10::impl::getDeviceGuardImpl(options_.device.type())->getStream(options_.device));
    m.in_use = batch;
  }
  out.x = tokens.select(1, 0);
  out.y = tokens.select(1, 1);
  if (tokens.size(1) == 3) out.positions = tokens.select(1, 2);
  out.target_rows = rows;
  out.sample_ids = ids;
  out.cu_seqlens = bounds;
  out.max_len = slot.max_len;
  const int64_t S = m.index.size();
  const int64_t g = m.start + (batch + 1) * options_.world_size * options_.micro_batch;
  out.state_after = LoaderState{g / S, g % S};
  state_ = out.state_after;
  return out;
}

void DataLoader::restart(LoaderState state, int64_t micro_batch) {
  if (micro_batch < 1) throw Error("data loader: micro batch must be >= 1");
  impl_->stop_workers();
  options_.micro_batch = micro_batch;
  state_ = state;
  impl_->start_workers(state.epoch * impl_->index.size() + state.consumed);
}

}  // namespace gpt2ft
