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

// Windows over the shards: sample s -> (shard, first token).
class SampleIndex {
 public:
  // Opens the shards; with vocab_size > 0 every id of each is checked once, here.
  SampleIndex(const std::vector<std::filesystem::path>& paths, int64_t T, int64_t vocab_size) : T_(T) {
    first_.push_back(0);
    for (const auto& p : paths) {
      shards_.push_back(std::make_unique<ShardReader>(p));
      if (vocab_size > 0) shards_.back()->check_ids(vocab_size);
      const int64_t n = shards_.back()->num_tokens();
      first_.push_back(first_.back() + (n > T ? (n - 1) / T : 0));
    }
  }
  int64_t size() const { return first_.back(); }
  // Copies the T+1 tokens of `sample` into out.
  void read(int64_t sample, int64_t* out) const {
    const size_t s = static_cast<size_t>(std::upper_bound(first_.begin(), first_.end(), sample) - first_.begin() - 1);
    shards_[s]->read((sample - first_[s]) * T_, T_ + 1, out);
  }

 private:
  int64_t T_;
  std::vector<std::unique_ptr<ShardReader>> shards_;
  std::vector<int64_t> first_;
};

}  // namespace

struct DataLoader::Impl {
  struct Slot {
    torch::Tensor host;  // (B, T+1) int64, pinned on CUDA
    std::vector<int64_t> samples;
    bool ready = false;
    std::exception_ptr error;
  };

  const LoaderOptions& opt;
  SampleIndex index;
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

  Impl(const LoaderOptions& o) : opt(o), index(o.shards, o.seq_len, o.vocab_size) {}

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
    slot.samples.resize(static_cast<size_t>(B));
    int64_t* dst = slot.host.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      slot.samples[static_cast<size_t>(i)] = sample_at(first + i);
      index.read(slot.samples[static_cast<size_t>(i)], dst + i * (T + 1));
    }
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
    for (auto& s : slots) {
      s.host = torch::empty({opt.micro_batch, opt.seq_len + 1}, torch::TensorOptions().dtype(torch::kLong).pinned_memory(pin));
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
    throw Error(describe_files(options_.shards) + ": no complete sample of seq_len+1 = " +
                std::to_string(options_.seq_len + 1) + " tokens in these shards; use a shorter data.seq_len or more data");
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
  torch::Tensor tokens;  // (B, T+1)
  if (options_.device.is_cpu()) {
    tokens = slot.host.clone();
    m.in_use = batch;
    m.release_in_use();
  } else {
    tokens = slot.host.to(options_.device, /*non_blocking=*/true);
    m.copy_done.emplace(options_.device.type());
    m.copy_done->record(c10::impl::getDeviceGuardImpl(options_.device.type())->getStream(options_.device));
    m.in_use = batch;
  }
  const int64_t T = options_.seq_len;
  out.x = tokens.narrow(1, 0, T);
  out.y = tokens.narrow(1, 1, T);
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
