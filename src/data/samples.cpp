// Samples: windows over the token stream, or whole documents packed into rows.
#include "gpt2ft/data/samples.h"

#include <algorithm>
#include <numeric>
#include <set>

#include <fmt/format.h>

#include "gpt2ft/core/error.h"

namespace gpt2ft {

bool shards_hold_documents(const std::string& pattern) {
  const std::vector<std::filesystem::path> files = glob_files(pattern);
  return !files.empty() && is_document_shard(files.front());
}

bool shards_hold_pairs(const std::string& pattern) {
  const std::vector<std::filesystem::path> files = glob_files(pattern);
  return !files.empty() && is_document_shard(files.front()) && ShardReader(files.front()).holds_pairs();
}

int64_t max_targets_per_pair(const std::string& pattern) {
  const std::vector<std::filesystem::path> files = glob_files(pattern);
  if (files.empty() || !is_document_shard(files.front())) return 0;
  const ShardReader r(files.front());
  if (!r.holds_pairs()) return 0;
  int64_t most = 0;
  for (int64_t d = 0; d + 1 < r.num_documents(); d += 2) {
    int64_t count = 0;
    for (int64_t i = r.document_start(d); i < r.document_end(d + 1); ++i) count += r.is_target(i);
    most = std::max(most, count);
  }
  return most;
}

Samples::~Samples() = default;

Samples::Samples(const std::vector<std::filesystem::path>& shards, const SampleOptions& options) : T_(options.seq_len) {
  if (T_ < 1) throw Error(options.what + ": seq_len must be >= 1");
  for (const auto& p : shards) {
    shards_.push_back(std::make_unique<ShardReader>(p));
    if (options.vocab_size > 0) shards_.back()->check_ids(options.vocab_size);
    if (shards_.back()->holds_pairs() != shards_.front()->holds_pairs()) {
      throw Error(options.what + ": " + shards_.front()->path().string() + " is " +
                  (shards_.front()->holds_pairs() ? "a preference shard" : "not a preference shard") + " but " +
                  p.string() + (shards_.front()->holds_pairs() ? " is not" : " is") +
                  "; give one kind of shards (tokenize --chosen-field/--rejected-field writes preference shards)");
    }
    if (shards_.back()->has_documents() != shards_.front()->has_documents()) {
      throw Error(options.what + ": " + shards_.front()->path().string() + " is a " +
                  (shards_.front()->has_documents() ? "document" : "plain text") + " shard but " + p.string() +
                  " is not; give one kind of shards (tokenize writes prompt/completion data as document shards)");
    }
  }
  documents_ = !shards_.empty() && shards_.front()->has_documents();
  if (!shards_.empty() && shards_.front()->holds_pairs()) {
    if (options.packing != "auto") {
      throw Error(options.what + ": " + describe_files(shards) + " are preference shards, read only as pairs; data.packing \"" +
                  options.packing + "\" does not apply to them: use \"auto\"");
    }
    packing_ = Packing::kPairs;
    index_pairs(options.too_long, options.what);
  } else if (options.packing == "documents" || (options.packing == "auto" && documents_)) {
    if (!documents_) {
      throw Error(options.what + ": data.packing \"documents\" needs document shards (tokenize --prompt-field ... "
                  "--completion-field ...), and " + describe_files(shards) +
                  " are plain text shards; use \"auto\" or \"concat\"");
    }
    packing_ = Packing::kDocuments;
    pack_documents(options.too_long, options.what);
  } else if (options.packing == "concat" || options.packing == "auto") {
    index_windows();
  } else {
    throw Error(options.what + ": unknown packing \"" + options.packing + "\" (expected auto, documents or concat)");
  }
  if (documents_ && size_ > 0 && std::accumulate(targets_.begin(), targets_.end(), int64_t{0}) == 0) {
    // Every loss would be 0 and nothing would train, without a word.
    throw Error(fmt::format(
        "{}: no sample of {} holds a target at data.seq_len {} ({} samples{}): every token is a prompt or padding. "
        "Check the target flags the shards were written with (tokenize --completion-field), or raise data.seq_len "
        "so that the completions fit",
        options.what, describe_files(shards), T_, size_,
        packing_ == Packing::kDocuments ? fmt::format(", {} documents, {} cut to {} tokens", docs_.size(), truncated_, T_ + 1)
                                        : std::string()));
  }
}

void Samples::index_windows() {
  first_window_.push_back(0);
  for (const auto& s : shards_) {
    const int64_t n = s->num_tokens() > T_ ? (s->num_tokens() - 1) / T_ : 0;
    for (int64_t k = 0; k < n; ++k) {
      if (!documents_) continue;
      int32_t count = 0;  // the window predicts tokens kT+1 .. kT+T
      for (int64_t i = k * T_ + 1; i <= k * T_ + T_; ++i) count += s->is_target(i);
      targets_.push_back(count);
    }
    first_window_.push_back(first_window_.back() + n);
    size_ = first_window_.back();
  }
}

void Samples::pack_documents(const std::string& too_long, const std::string& what) {
  std::vector<int64_t> doc_targets;
  for (uint32_t s = 0; s < shards_.size(); ++s) {
    const ShardReader& r = *shards_[s];
    for (int64_t d = 0; d < r.num_documents(); ++d) {
      const int64_t start = r.document_start(d), length = r.document_end(d) - start;
      if (length < 2) continue;  // nothing to predict
      if (length > T_ + 1) {
        if (too_long == "error") {
          throw Error(fmt::format("{}: document {} of {} has {} tokens, more than data.seq_len + 1 = {}; raise "
                                  "data.seq_len, shorten the data, or set data.too_long \"truncate\" to cut such "
                                  "documents to their first {} tokens",
                                  what, d, r.path().string(), length, T_ + 1, T_ + 1));
        }
        ++truncated_;
      }
      docs_.push_back({s, start, std::min(length, T_ + 1)});
      doc_targets.push_back(targets_of(docs_.back()));
    }
  }
  // Best fit, longest first: each document goes to the row with the least room that holds it.
  std::vector<uint32_t> order(docs_.size());
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return docs_[a].length > docs_[b].length; });
  std::vector<std::vector<uint32_t>> rows;
  std::vector<int64_t> room;
  std::set<std::pair<int64_t, int64_t>> open;  // (room, row)
  for (const uint32_t d : order) {
    const int64_t need = docs_[d].length - 1;
    auto it = open.lower_bound({need, -1});
    int64_t row;
    if (it == open.end()) {
      row = static_cast<int64_t>(rows.size());
      rows.emplace_back();
      room.push_back(T_);
    } else {
      row = it->second;
      open.erase(it);
    }
    rows[static_cast<size_t>(row)].push_back(d);
    room[static_cast<size_t>(row)] -= need;
    if (room[static_cast<size_t>(row)] > 0) open.insert({room[static_cast<size_t>(row)], row});
  }
  row_first_.push_back(0);
  for (size_t r = 0; r < rows.size(); ++r) {
    int64_t count = 0;
    for (const uint32_t d : rows[r]) {
      rows_.push_back(d);
      count += doc_targets[d];
    }
    row_first_.push_back(static_cast<int64_t>(rows_.size()));
    targets_.push_back(static_cast<int32_t>(count));
    padding_ += room[r];
  }
  size_ = static_cast<int64_t>(rows.size());
}

int64_t Samples::targets_of(const Document& d) const {
  const ShardReader& r = *shards_[d.shard];
  int64_t count = 0;
  for (int64_t i = d.start + 1; i < d.start + d.length; ++i) count += r.is_target(i);
  return count;
}

void Samples::index_pairs(const std::string& too_long, const std::string& what) {
  for (uint32_t s = 0; s < shards_.size(); ++s) {
    const ShardReader& r = *shards_[s];
    for (int64_t d = 0; d < r.num_documents(); d += 2) {
      const int64_t chosen = r.document_start(d), rejected = r.document_start(d + 1);
      const int64_t longest = std::max(r.document_end(d) - chosen, r.document_end(d + 1) - rejected);
      const int64_t excess = std::max<int64_t>(0, longest - (T_ + 1));
      if (excess > 0 && too_long == "error") {
        throw Error(fmt::format("{}: example {} of {} (documents {} and {}) has {} tokens on its longer side, more "
                                "than data.seq_len + 1 = {}; raise data.seq_len, shorten the data, or set "
                                "data.too_long \"truncate\" to cut its prompt's beginning first",
                                what, d / 2, r.path().string(), d, d + 1, longest, T_ + 1));
      }
      // The prompt's beginning goes first (it keeps its last token), then each continuation's end.
      const int64_t cut = std::min(excess, r.prompt_length(d) - 1);
      truncated_ += excess > 0;
      for (const int64_t start : {chosen, rejected}) {
        const int64_t length = r.document_end(start == chosen ? d : d + 1) - start;
        docs_.push_back({s, start + cut, std::min(length - cut, T_ + 1)});
      }
      const Document& a = docs_[docs_.size() - 2];
      const Document& b = docs_.back();
      targets_.push_back(static_cast<int32_t>(targets_of(a) + targets_of(b)));
      padding_ += 2 * T_ - (a.length - 1) - (b.length - 1);
    }
  }
  size_ = static_cast<int64_t>(targets_.size());
}

int64_t Samples::read_pair(int64_t sample, int side, int64_t* x, int64_t* y) const {
  const Document& d = docs_[static_cast<size_t>(2 * sample + side)];
  const ShardReader& r = *shards_[d.shard];
  std::fill(x, x + T_, 0);
  std::fill(y, y + T_, kIgnoreTarget);
  std::vector<int64_t> tokens(static_cast<size_t>(d.length));
  r.read(d.start, d.length, tokens.data());
  int64_t count = 0;
  for (int64_t i = 0; i + 1 < d.length; ++i) {
    x[i] = tokens[static_cast<size_t>(i)];
    if (r.is_target(d.start + i + 1)) y[i] = tokens[static_cast<size_t>(i) + 1], ++count;
  }
  return count;
}

int64_t Samples::read(int64_t sample, int64_t* x, int64_t* y, int64_t* positions) const {
  if (packing_ == Packing::kPairs) throw Error("preference pairs are read a side at a time (read_pair)");
  if (packing_ == Packing::kConcat) {
    const size_t s = static_cast<size_t>(
        std::upper_bound(first_window_.begin(), first_window_.end(), sample) - first_window_.begin() - 1);
    const ShardReader& r = *shards_[s];
    const int64_t begin = (sample - first_window_[s]) * T_;
    r.read(begin, T_, x);  // y is x shifted by one, and the token after the window
    std::copy(x + 1, x + T_, y);
    y[T_ - 1] = r.token(begin + T_);
    if (documents_) {
      for (int64_t i = 0; i < T_; ++i) {
        if (!r.is_target(begin + 1 + i)) y[i] = kIgnoreTarget;
      }
    }
    return targets(sample);
  }
  std::fill(x, x + T_, 0);
  std::fill(y, y + T_, kIgnoreTarget);
  std::fill(positions, positions + T_, 0);
  int64_t at = 0;
  std::vector<int64_t> tokens;
  for (int64_t k = row_first_[static_cast<size_t>(sample)]; k < row_first_[static_cast<size_t>(sample) + 1]; ++k) {
    const Document& d = docs_[rows_[static_cast<size_t>(k)]];
    const ShardReader& r = *shards_[d.shard];
    tokens.resize(static_cast<size_t>(d.length));
    r.read(d.start, d.length, tokens.data());
    for (int64_t i = 0; i + 1 < d.length; ++i) {
      x[at + i] = tokens[static_cast<size_t>(i)];
      y[at + i] = r.is_target(d.start + i + 1) ? tokens[static_cast<size_t>(i) + 1] : kIgnoreTarget;
      positions[at + i] = i;
    }
    at += d.length - 1;
  }
  return targets(sample);
}

std::string Samples::describe() const {
  const int64_t S = size();
  const int64_t all_targets = std::accumulate(targets_.begin(), targets_.end(), int64_t{0});  // document shards
  const double positions = static_cast<double>(S) * static_cast<double>(T_);
  if (packing_ == Packing::kPairs) {
    return fmt::format("{} preference pairs, each a chosen and a rejected row of {} positions, {:.1f}% padding, {} cut "
                       "to fit (the prompt's beginning first; data.too_long); {} targets ({:.1f}% of positions)",
                       S, T_, 100.0 * padding_ / std::max(2 * positions, 1.0), truncated_, all_targets,
                       100.0 * all_targets / std::max(2 * positions, 1.0));
  }
  if (packing_ == Packing::kConcat) {
    if (!documents_) return fmt::format("plain text: {} windows of {} tokens", S, T_ + 1);
    return fmt::format("document shards read as one stream (data.packing \"concat\": documents attend to each other): "
                       "{} windows of {} tokens, {} targets ({:.1f}% of positions)",
                       S, T_ + 1, all_targets, 100.0 * all_targets / std::max(positions, 1.0));
  }
  return fmt::format("{} documents packed into {} rows of {} positions, {:.1f}% padding, {} cut to {} tokens "
                     "(data.too_long); {} targets ({:.1f}% of positions)",
                     docs_.size(), S, T_, 100.0 * padding_ / std::max(positions, 1.0), truncated_, T_ + 1,
                     all_targets, 100.0 * all_targets / std::max(positions, 1.0));
}

int64_t packed_sequence_bounds(const int64_t* positions, const int64_t* targets, int64_t rows, int64_t T,
                               int64_t stride, int32_t* cu_seqlens, int64_t& max_len) {
  int64_t d = 0;
  max_len = 0;
  auto start = [&](int64_t at) {
    if (d > 0) max_len = std::max<int64_t>(max_len, at - cu_seqlens[d - 1]);
    cu_seqlens[d++] = static_cast<int32_t>(at);
  };
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t* pos = positions + i * stride;
    const int64_t* y = targets + i * stride;
    int64_t padding = T;  // where the row's trailing padding begins
    while (padding > 0 && pos[padding - 1] == 0 && y[padding - 1] == kIgnoreTarget) --padding;
    for (int64_t t = 0; t < padding; ++t) {
      if (pos[t] == 0 || t == 0) start(i * T + t);  // a row always starts a sequence
    }
    if (padding < T) start(i * T + padding);
  }
  start(rows * T);
  return d - 1;
}

}  // namespace gpt2ft
