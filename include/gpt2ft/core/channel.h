// A bounded, thread-safe hand-off between two stages of a pipeline (reading -> tokenizing ->
// writing): push blocks while `capacity` items wait, pop blocks while none does.
#pragma once

#include <condition_variable>
#include <deque>
#include <mutex>
#include <utility>

namespace gpt2ft {

template <class T>
class Channel {
 public:
  explicit Channel(size_t capacity) : capacity_(capacity) {}

  // False once the channel is closed (the item is dropped): the consumer stopped.
  bool push(T item) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return items_.size() < capacity_ || closed_; });
    if (closed_) return false;
    items_.push_back(std::move(item));
    changed_.notify_all();
    return true;
  }

  // False when the channel is closed and drained: the producer is done (or failed).
  bool pop(T& item) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return !items_.empty() || closed_; });
    if (items_.empty()) return false;
    item = std::move(items_.front());
    items_.pop_front();
    changed_.notify_all();
    return true;
  }

  // The producer is done: pop returns what is left, then false.
  void close() {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
    changed_.notify_all();
  }

  // A stage failed: what waits is dropped, and both sides stop at their next call.
  void abort() {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
    items_.clear();
    changed_.notify_all();
  }

 private:
  size_t capacity_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<T> items_;
  bool closed_ = false;
};

}  // namespace gpt2ft
