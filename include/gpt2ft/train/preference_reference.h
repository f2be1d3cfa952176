// The reference model of preference training (DPO), without a second model in memory where
// one can be avoided (dpo.reference):
//
//   "precomputed"  the initial model scores every example of data.train (and data.val) once,
//                  before training, in eval mode, in passes that halve on out of memory; the
//                  table (examples, 2) lies beside the run in reference_logps.safetensors under
//                  the run's fingerprint and both data sets' shard identities, written whole
//                  then renamed (save()); a resume reuses it when that key and its row counts
//                  match, and otherwise scores again
//   "base"         LoRA: the policy itself with its adapters switched off (AdaptersOff), on the
//                  fly, in eval mode; with modules_to_save (a chat template's new tokens) the
//                  embedding kept frozen when the adapters were added: one embedding, not a model
//   "model"        a frozen copy of the initial model (adapters folded in): the blocks' matmul
//                  weights (and an untied lm_head) in the autocast dtype, everything else as
//                  the policy holds it, so that it computes exactly as the initial policy
//
// Each gives a batch's (2B) reference log-prob sums, chosen and rejected alternating as the
// loader lays a batch of pairs out (data/loader.h), without gradients.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <torch/types.h>

#include "gpt2ft/data/loader.h"
#include "gpt2ft/data/samples.h"
#include "gpt2ft/distributed/communicator.h"
#include "gpt2ft/model/gpt2.h"
#include "gpt2ft/train/config.h"
#include "gpt2ft/train/preference_loss.h"

namespace gpt2ft {

// The pair samples of preference shards (`what` names them in messages), rows of `seq_len`
// positions, ids checked against `vocab_size`.
std::unique_ptr<Samples> pair_samples(const std::vector<std::filesystem::path>& shards, int64_t seq_len,
                                      const std::string& too_long, int64_t vocab_size, const std::string& what);

// Examples `ids` of pair samples as one batch on `device`: (2n, T) rows, targets and their rows.
Batch pair_batch(const Samples& samples, const std::vector<int64_t>& ids, c10::Device device);

// score(batch) of examples `ids`, in passes of at most `per_pass` examples, the results (2n
// rows each) concatenated; out of memory halves `per_pass` (down to 1, then it is rethrown).
torch::Tensor score_in_passes(const Samples& samples, const std::vector<int64_t>& ids, int64_t& per_pass,
                              c10::Device device, const std::function<torch::Tensor(const Batch&)>& score);

// Each row's summed target log-prob (2B) under `model`, in eval mode and without gradients
// (the model's mode is restored).
torch::Tensor reference_row_logprobs(GPT2& model, const Batch& batch, bool chunked);

class PreferenceReference {
 public:
  virtual ~PreferenceReference() = default;
  // (2B) float32 on the batch's device. `validation`: batch.samples are data.val's examples.
  virtual torch::Tensor logps(GPT2& policy, const Batch& batch, bool validation) = 0;
  // Keeps what a resume needs beside the run (the precomputed tables; rank 0 writes). Called
  // once output_dir is known to be this run's, so another run's files are never replaced.
  virtual void save(Communicator&) {}
};

// "base" on its own: the policy with its adapters off (AdaptersOff), e.g. for `eval --adapter`.
std::unique_ptr<PreferenceReference> base_reference(bool chunked);
// Another model as the reference (`eval --reference DIR`): its log-probs, in eval mode.
std::unique_ptr<PreferenceReference> model_reference(GPT2 model, bool chunked);

// DPO's loss and TRL's metrics over examples `ids` of pair `samples`: `policy` against
// `reference` (`validation`: the ids are data.val's), without gradients, under autocast `amp`,
// in passes of at most `per_pass` examples that halve on out of memory. Returns (8) float64 on
// the device: the sums over the examples of the loss and of preference_metric_names()'s six
// metrics (rewards, accuracy, margin, log-probs), then the target tokens.
torch::Tensor preference_sums(GPT2& policy, PreferenceReference& reference, const Samples& samples,
                              const std::vector<int64_t>& ids, int64_t& per_pass, const PreferenceLossOptions& options,
                              bool chunked, c10::ScalarType amp, c10::Device device, bool validation);

// The run's reference. "precomputed" scores the data here with `policy` as it is (the initial
// model: call before a checkpoint's weights are loaded), collectively over the ranks, or reads
// the table a previous start of this run left, `micro_batch` examples a pass (eval.batch_size
// when set) until memory runs out.
std::unique_ptr<PreferenceReference> make_preference_reference(const TrainConfig& cfg, GPT2& policy,
                                                               c10::ScalarType amp, Communicator& comm,
                                                               c10::Device device, int64_t micro_batch);

}  // namespace gpt2ft
