// The planner applied to a training config.
#include "gpt2ft/memory/run_memory.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/core/cuda_info.h"
#include "gpt2ft/data/samples.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/data/shard_manifest.h"
#include "gpt2ft/memory/levers.h"

namespace gpt2ft {

MemoryPlanInput memory_plan_input(const TrainConfig& cfg, int64_t world_size) {
  MemoryPlanInput in;
  in.world_size = world_size;
  in.model = cfg.model.init_from.empty()
                 ? GPT2Config::preset(cfg.model.preset)
                 : GPT2Config::from_file(std::filesystem::path(cfg.model.init_from) / "config.json");
  const double dropout = cfg.model_dropout();
  if (dropout >= 0) in.model.resid_pdrop = in.model.embd_pdrop = in.model.attn_pdrop = dropout;
  const int64_t vocab = in.model.vocab_size;
  const auto chat = cfg.data.train.empty() ? std::nullopt : shard_chat(glob_files(cfg.data.train));
  in.model.vocab_size = vocab_for_data(chat, vocab, cfg.model.resize_vocab);
  in.lora_embeddings = cfg.lora() && chat && chat->vocab_size() > vocab;  // the chat tokens' rows train
  in.seq_len = cfg.data.seq_len;
  in.cuda = cfg.device != "cpu";
  in.amp = resolve_amp_dtype(cfg.amp.dtype, in.cuda ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU));
  in.checkpoint_every = cfg.checkpoint_every_n_blocks();
  in.dropout = in.model.resid_pdrop > 0 || in.model.attn_pdrop > 0;
  in.chunked_loss = cfg.train.chunked_loss;
  in.shard_optimizer = cfg.distributed.shard_optimizer;
  in.optimizer_offload = cfg.train.optimizer_offload == "cpu";
  in.optimizer_8bit = cfg.train.optimizer == "adamw_8bit";
  in.quantize_embeddings = cfg.train.adamw_8bit_embeddings == "8bit";
  in.freeze_embeddings = cfg.model.freeze_embeddings;
  in.freeze_blocks = cfg.model.freeze_blocks;
  in.packed_documents = cfg.data.packing == "documents" ||
                        (cfg.data.packing == "auto" && !cfg.data.train.empty() && shards_hold_documents(cfg.data.train));
  const int64_t accum = std::max<int64_t>(1, cfg.train.gradient_accumulation_steps);
  in.global_batch = cfg.train.global_batch_size > 0 ? cfg.train.global_batch_size
                    : cfg.micro_batch_auto()        ? 0
                                                    : cfg.train.micro_batch_size * accum * world_size;
  if (cfg.preference_training()) {  // each sample a pair of rows, not packed
    in.sequences_per_sample = 2;
    in.packed_documents = false;
    // Only the targets reach the LM head: a chunk holds at most that many rows a pair.
    in.head_rows_per_sample = max_targets_per_pair(cfg.data.train);
    in.target_logprobs = cfg.train.chunked_loss;
    in.reference_forward = cfg.dpo.reference != "precomputed";
    const GPT2Config& m = in.model;
    const int64_t embedding = m.vocab_size * m.n_embd * (m.tie_word_embeddings ? 1 : 2);  // wte (and lm_head)
    if (cfg.dpo.reference == "model") {
      // The copy: its matmul weights in the autocast dtype, everything else as the policy holds it.
      const int64_t C = m.n_embd, I = m.inner_dim();
      const int64_t matmul = m.n_layer * (4 * C * C + 2 * C * I) + (m.tie_word_embeddings ? 0 : m.vocab_size * C);
      const int64_t rest_bytes = cfg.lora() && cfg.model.lora.base_dtype != "float32" ? 2 : 4;
      in.reference_weights = (in.amp == c10::kFloat ? 4 : 2) * matmul + rest_bytes * (m.num_parameters() - matmul);
    } else if (cfg.dpo.reference == "base" && in.lora_embeddings) {
      in.reference_weights = 4 * embedding;  // the embedding as it was, kept frozen beside the trained one
    }
  }
  if (cfg.lora()) {
    const LoraConfig lora = cfg.lora_config();
    in.lora_rank = lora.rank;
    in.lora_targets = lora.targets;
    in.lora_dropout = lora.dropout > 0;
    in.base_bytes = cfg.model.lora.base_dtype == "float32" ? 4 : 2;
  }
  return in;
}

int64_t plannable_memory(const TrainConfig& cfg, c10::Device device) {
  if (!device.is_cuda()) {  // cpu.memory_limit is a cap on tensor bytes alone: no context, no allocator slack
    if (!cfg.cpu.memory_limit.empty()) return parse_memory_size(cfg.cpu.memory_limit, "cpu.memory_limit");
    return static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE) / 2;
  }
  int64_t total = cuda_memory(device).total;
  if (!cfg.cuda.memory_limit.empty()) total = std::min(total, parse_memory_size(cfg.cuda.memory_limit, "cuda.memory_limit"));
  return plannable_of(total);
}

std::string describe_plannable_memory(const TrainConfig& cfg, c10::Device device) {
  const int64_t budget = plannable_memory(cfg, device);
  if (!device.is_cuda()) {
    if (!cfg.cpu.memory_limit.empty()) {
      return fmt::format("cpu.memory_limit \"{}\" = {} of tensor bytes (on the CPU no context or allocator slack is "
                         "set aside)", cfg.cpu.memory_limit, format_memory(budget));
    }
    return fmt::format("half of this machine's {} of memory, {} (no cpu.memory_limit set; the \"auto\" settings plan "
                       "for the same)", format_memory(2 * budget), format_memory(budget));
  }
  const int64_t total = cuda_memory(device).total;
  const bool capped = !cfg.cuda.memory_limit.empty() &&
                      parse_memory_size(cfg.cuda.memory_limit, "cuda.memory_limit") < total;
  return fmt::format("{} {}, less 1 GiB for the CUDA context and 5% for the allocator: {} usable",
                     capped ? "cuda.memory_limit \"" + cfg.cuda.memory_limit + "\" =" : "the GPU's",
                     format_memory(capped ? parse_memory_size(cfg.cuda.memory_limit, "cuda.memory_limit") : total),
                     format_memory(budget));
}

int64_t plannable_of(int64_t device_bytes) {
  return std::max<int64_t>(0, static_cast<int64_t>(0.95 * static_cast<double>(device_bytes - (1ll << 30))));
}

int64_t auto_micro_batch(const TrainConfig& cfg, c10::Device device, const BatchSplit& split) {
  const MemoryPlan plan = plan_memory(memory_plan_input(cfg, split.world));
  const int64_t budget = plannable_memory(cfg, device);
  if (split.auto_accumulation > 0) {  // the global batch follows: the largest that fits, up to the cap
    const int64_t micro = std::clamp<int64_t>(plan.largest_accumulating_micro_batch(budget), 1, kAutoMicroBatchCap);
    spdlog::info("train.micro_batch_size \"auto\" with train.gradient_accumulation_steps {}: micro batch {} (the largest "
                 "that fits {}, at most {}; peak {} predicted), so the global batch is {} x {} x {} rank(s) = {}",
                 split.auto_accumulation, micro, format_memory(budget), kAutoMicroBatchCap,
                 format_memory(plan.peak(micro)), micro, split.auto_accumulation, split.world,
                 micro * split.auto_accumulation * split.world);
    return micro;
  }
  const int64_t fits = std::min(plan.largest_micro_batch(budget), split.per_rank());
  const int64_t micro = largest_divisor_at_most(split.per_rank(), fits);
  spdlog::info("train.micro_batch_size \"auto\": the planner predicts {:.2f} GiB fixed + {:.3f} GiB per sequence; "
               "{} fit in {:.1f} GiB; using micro batch {} (peak {:.2f} GiB predicted)",
               plan.fixed() / double(1ll << 30), plan.per_sequence() / double(1ll << 30), fits,
               budget / double(1ll << 30), micro, plan.peak(micro) / double(1ll << 30));
  return micro;
}

std::optional<int64_t> least_checkpointing_that_fits(MemoryPlanInput in, int64_t micro, int64_t budget) {
  const int64_t L = in.model.n_layer;
  std::vector<int64_t> candidates = {0};
  for (int64_t n = L; n >= 1; --n) {  // every n-th block: ceil(L / n) blocks, more as n falls
    if (candidates.size() == 1 || (L + n - 1) / n != (L + candidates.back() - 1) / candidates.back()) {
      candidates.push_back(n);
    }
  }
  for (const int64_t every : candidates) {
    in.checkpoint_every = every;
    if (plan_memory(in).peak(micro) <= budget) return every;
  }
  return std::nullopt;
}

int64_t auto_checkpointing(const TrainConfig& cfg, c10::Device device, const BatchSplit& split) {
  const int64_t micro = split.micro > 0 ? split.micro : std::min<int64_t>(split.per_rank(), 8);
  const int64_t budget = plannable_memory(cfg, device);
  MemoryPlanInput in = memory_plan_input(cfg, split.world);
  const std::optional<int64_t> every = least_checkpointing_that_fits(in, micro, budget);
  in.checkpoint_every = every.value_or(1);
  const int64_t peak = plan_memory(in).peak(micro);
  const std::string what = in.checkpoint_every == 0   ? "none"
                           : in.checkpoint_every == 1 ? "all blocks"
                                                      : "every " + std::to_string(in.checkpoint_every) + "th block";
  if (every) {
    spdlog::info("model.activation_checkpointing \"auto\": {} (micro batch {}: {:.2f} GiB predicted of {:.1f} GiB)",
                 what, micro, peak / double(1ll << 30), budget / double(1ll << 30));
  } else {
    spdlog::warn("model.activation_checkpointing \"auto\": micro batch {} does not fit {:.1f} GiB even with every "
                 "block checkpointed ({:.2f} GiB predicted); using all and relying on the out-of-memory back-off",
                 micro, budget / double(1ll << 30), peak / double(1ll << 30));
  }
  return in.checkpoint_every;
}

}  // namespace gpt2ft
