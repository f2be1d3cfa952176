// Evaluation: mean next-token loss of a model over token shards (over the target tokens only,
// for document shards).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "gpt2ft/distributed/communicator.h"
#include "gpt2ft/model/gpt2.h"

namespace gpt2ft {

struct EvalOptions {
  int64_t seq_len = 1024;   // T: each window holds T+1 tokens, stride T (or a row of T positions)
  std::string packing = "auto", too_long = "truncate";  // data/samples.h
  std::string what = "--data";  // names the shards in messages
  int64_t batch_size = 8;   // windows per batch (and per forward pass until memory runs out)
  int64_t max_sequences = 0;  // the first N windows; 0 = all (never depends on batch_size or ranks)
  int64_t max_forward_batch = 0;  // windows per forward pass at most (an earlier evaluation's back-off); 0 = batch_size
  c10::ScalarType amp_dtype = c10::kFloat;  // autocast dtype (kFloat: none)
  // Data-parallel: rank r evaluates batches r, r+W, ... and the sums are all-reduced, so
  // every rank gets the single-process result. Null: this process evaluates everything.
  Communicator* comm = nullptr;
};

struct EvalResult {
  double loss = 0;         // mean cross-entropy (nats) over the target tokens
  int64_t tokens = 0;      // target tokens: every predicted token of plain text
  int64_t sequences = 0;   // windows (or packed rows) evaluated
  double perplexity = 0;   // exp(loss)
  int64_t batches = 0;
  int64_t forward_batch = 0;
  // Preference validation (train.objective "dpo"): loss is the DPO loss, and these are TRL's
  // rewards/* and logps/* means over the pairs.
  std::vector<std::pair<std::string, double>> metrics;  // windows per forward pass at the end (below batch_size after out-of-memory)
};

// Cuts each shard into windows k = tokens[kT .. kT+T] (the incomplete tail is dropped), or
// packs document shards' documents into rows (data/samples.h), and averages the loss of
// predicting the targets (tokens 1..T of each window) from the tokens before. The loss goes
// through the chunked lm_head + cross-entropy (model/linear_cross_entropy.h) without
// gradients, so no batch's logits are ever held whole. When a forward pass runs out of
// memory, the rest is evaluated with half as many windows per pass (logged; the result is
// the same), down to one.
EvalResult evaluate(GPT2& model, const std::vector<std::filesystem::path>& shards,
                    const EvalOptions& options, c10::Device device);

}  // namespace gpt2ft
