// The samples of a set of shards, as training and evaluation read them.
//
// "concat" (llm.c's way, the only one for plain text shards): sample k of a shard is the
// window of T+1 tokens starting at kT; documents run into each other and every token is a
// target, except in document shards, whose prompt tokens stay inputs only.
//
// "documents" (document shards, data.packing "auto"): every document is kept whole and
// packed best-fit (longest first, each into the fullest row it fits) into rows of T
// positions. A document of L tokens fills L-1 positions (inputs 0..L-2, targets 1..L-1); its
// positions restart at 0, and the model lets it attend only to itself (a new document starts
// wherever the position is 0). What is left of a row is padding: position 0 (one token to
// itself), never a target. A document longer than T+1 tokens is cut to its first T+1, or,
// with too_long "error", refused. The packing depends only on the shards and T, so a run
// resumes at the same sample with any micro batch or number of ranks.
//
// "pairs" (preference shards, always): a sample is one example, read as two rows of T
// positions, its prompt + chosen and its prompt + rejected, each from position 0 and padded
// (never packed with another example, so a pair is never split). An example whose longer side
// exceeds T+1 tokens is cut, with too_long "truncate", first at its prompt's beginning (the
// prompt keeps at least its last token, and both continuations all their targets), and only
// then at each continuation's end; with too_long "error" it is refused.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "gpt2ft/data/shard.h"

namespace gpt2ft {

// A target that is not predicted (PyTorch's ignore_index).
inline constexpr int64_t kIgnoreTarget = -100;

enum class Packing { kConcat, kDocuments, kPairs };

struct SampleOptions {
  int64_t seq_len = 1024;             // T
  std::string packing = "auto";       // "auto" | "documents" | "concat" (data.packing)
  std::string too_long = "truncate";  // "truncate" | "error" (data.too_long)
  int64_t vocab_size = 0;             // when > 0, every id is checked against it once, on open
  std::string what = "data.train";    // names the shards in messages
};

// Whether the shards a glob names are document (or preference) shards (by the first one's
// magic number: a planner's question, asked once per lever); false when it names none.
bool shards_hold_documents(const std::string& pattern);
// Whether they are preference shards (the first one's header).
bool shards_hold_pairs(const std::string& pattern);
// The most target tokens of one example (both sides) of the first of those preference shards,
// for the planner: a micro batch of m examples sends at most m times that many rows to the LM
// head. 0 when there is none.
int64_t max_targets_per_pair(const std::string& pattern);

// The sequences of packed rows for variable-length attention, found on the host so that no
// forward pass reads them back from the device. Row i's positions and targets are
// positions[i * stride + t] and targets[i * stride + t] (t < T). A sequence starts wherever
// the position is 0, except inside a row's trailing padding (position 0 and no target), which
// is one sequence of its own instead of one a token. Writes the D + 1 starts in the
// rows * T flattened tokens (the last is rows * T) to cu_seqlens, which has room for
// rows * T + 1; returns D, and the longest sequence in max_len.
int64_t packed_sequence_bounds(const int64_t* positions, const int64_t* targets, int64_t rows, int64_t T,
                               int64_t stride, int32_t* cu_seqlens, int64_t& max_len);

class Samples {
 public:
  Samples(const std::vector<std::filesystem::path>& shards, const SampleOptions& options);
  ~Samples();
  Samples(const Samples&) = delete;
  Samples& operator=(const Samples&) = delete;

  int64_t size() const { return size_; }
  int64_t seq_len() const { return T_; }
  Packing packing() const { return packing_; }
  // Document shards: only some tokens are targets, and a loss is normalised by their count.
  bool has_targets() const { return documents_; }
  // Rows a sample reads as: 2 for preference pairs (chosen, rejected), else 1.
  int64_t sequences_per_sample() const { return packing_ == Packing::kPairs ? 2 : 1; }
  // Sample s into x (T) inputs, y (T) targets (kIgnoreTarget where there is none) and, when
  // packed by documents, positions (T). Returns its number of targets. Pairs: read_pair.
  int64_t read(int64_t sample, int64_t* x, int64_t* y, int64_t* positions) const;
  // Pairs: side 0 (prompt + chosen) or 1 (prompt + rejected) of example `sample` into x (T)
  // and y (T), padded after its end. Returns its number of targets.
  int64_t read_pair(int64_t sample, int side, int64_t* x, int64_t* y) const;
  int64_t targets(int64_t sample) const { return documents_ ? targets_[static_cast<size_t>(sample)] : T_; }
  // One line for the log: the kind of data, the packing, padding, truncation and targets.
  std::string describe() const;

 private:
  struct Document {
    uint32_t shard;
    int64_t start;
    int64_t length;  // tokens used (at most T+1)
  };
  void index_windows();
  void pack_documents(const std::string& too_long, const std::string& what);
  void index_pairs(const std::string& too_long, const std::string& what);
  int64_t targets_of(const Document& d) const;

  int64_t T_;
  Packing packing_ = Packing::kConcat;
  bool documents_ = false;
  std::vector<std::unique_ptr<ShardReader>> shards_;
  int64_t size_ = 0;
  std::vector<int32_t> targets_;  // per sample, for document shards
  // concat: the first sample of each shard (and the total at the end)
  std::vector<int64_t> first_window_;
  // documents: the documents of sample s are rows_[row_first_[s] .. row_first_[s+1]);
  // pairs: docs_[2s] and docs_[2s+1] are its two sides, already cut to fit
  std::vector<Document> docs_;
  std::vector<int64_t> row_first_;
  std::vector<uint32_t> rows_;
  int64_t truncated_ = 0, padding_ = 0;
};

}  // namespace gpt2ft
