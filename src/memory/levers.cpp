// The levers `plan` proposes.
#include "gpt2ft/memory/levers.h"

#include <algorithm>
#include <cstdlib>

#include <fmt/format.h>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/memory/planner.h"
#include "gpt2ft/memory/run_memory.h"
#include "gpt2ft/train/batch_split.h"

namespace gpt2ft {
namespace {

// Rough rates for the offload cost: PCIe (one direction) and host memory bandwidth.
constexpr double kPcieBytesPerS = 20e9, kHostBytesPerS = 10e9;

struct Candidate {
  MemoryLever lever;
  bool applies = true;
  bool in_combination = true;  // false: an alternative to the other levers, never combined
  std::string group = {};      // a later lever of the same group replaces an earlier one in a combination
};

MemoryPlanInput with_8bit(MemoryPlanInput in, bool on) {
  in.optimizer_8bit = on;
  return in;
}

// The config with `settings` applied.
TrainConfig with(const TrainConfig& cfg, const std::vector<std::string>& settings) {
  return TrainConfig::parse(cfg.to_json(), settings, "plan");
}

void evaluate(MemoryLever& lever, const TrainConfig& cfg, int64_t micro, int64_t budget) {
  const MemoryPlan plan = plan_memory(memory_plan_input(with(cfg, all_settings(lever)), lever.world_size));
  lever.peak = plan.peak(lever.micro_batch > 0 ? lever.micro_batch : micro);
  // A lever that splits the batch holds the gradients between its micro batches.
  lever.largest_micro_batch = lever.micro_batch > 0 ? plan.largest_accumulating_micro_batch(budget)
                                                    : plan.largest_micro_batch(budget);
}

// The levers in order of cost: none first, then time, then memory traffic, then what trains.
// `micro`: the micro batch that does not fit in `budget`.
std::vector<Candidate> candidates(const TrainConfig& cfg, int64_t world, int64_t micro, int64_t budget) {
  const MemoryPlanInput in = memory_plan_input(cfg, world);
  const int64_t L = in.model.n_layer, T = cfg.data.seq_len;
  const auto params = static_cast<double>(in.model.num_parameters());
  // On one GPU the gradients go to the host while backward runs: the weights' way back and
  // the host step remain. With ranks the averaged gradients go after backward.
  const double pcie_bytes = world == 1 ? 4.0 : 8.0;
  const double offload_ms = 1e3 * (pcie_bytes * params / kPcieBytesPerS + 28.0 * params / kHostBytesPerS);
  const bool autocast = in.amp != c10::kFloat;
  const int64_t every = cfg.checkpoint_every_n_blocks();
  std::vector<Candidate> out;
  out.push_back({{"the chunked loss", {"train.chunked_loss=true"},
                  "none: the same loss, its logits made a chunk of rows at a time"},
                 !cfg.train.chunked_loss});
  out.push_back({{"bf16 autocast", {"amp.dtype=bfloat16"}, "none on Ampere and newer GPUs (usually faster)"},
                 !autocast && in.cuda});
  // Smaller micro batches, the same global batch (the README's first lever): the largest that
  // fits with the gradients held between them, and divides this rank's share of the batch.
  const BatchSplit split = batch_split_of(cfg, world);
  const int64_t fits = split.global > 0 ? plan_memory(in).largest_accumulating_micro_batch(budget) : 0;
  const int64_t m = fits >= 1 ? largest_divisor_at_most(split.per_rank(), std::min(fits, micro)) : 0;
  Candidate accumulate{{fmt::format("micro batch {} x accumulation {}", m, m > 0 ? split.per_rank() / m : 0),
                        {fmt::format("train.micro_batch_size={}", m), fmt::format("train.global_batch_size={}", split.global)},
                        fmt::format("none in the result: the same global batch of {} in {} micro batches a step; each "
                                    "step slower (smaller matrix products)", split.global, m > 0 ? split.per_rank() / m : 0)},
                       m >= 1 && m < micro,
                       /*in_combination=*/false};
  accumulate.lever.micro_batch = m;
  out.push_back(accumulate);
  out.push_back({{"activation checkpointing, every 2nd block", {"model.activation_checkpointing=2"},
                  "about 17% more compute (half the blocks run forward twice)"},
                 every == 0 || every > 2, true, "checkpointing"});  // "all" replaces it if needed
  out.push_back({{"activation checkpointing, all blocks", {"model.activation_checkpointing=all"},
                  "about 33% more compute (one extra forward pass)"},
                 every != 1, true, "checkpointing"});
  const int64_t trained = plan_memory(in).gradients / 4;
  // fused_adamw "on" names AdamW's kernel, which the trainer refuses beside 8-bit AdamW's own step.
  std::vector<std::string> eight_bit = {"train.optimizer=adamw_8bit"};
  if (cfg.train.fused_adamw == "on") eight_bit.push_back("train.fused_adamw=auto");
  out.push_back({{"8-bit AdamW", eight_bit,
                  fmt::format("the moments in 8-bit blocks on the device: {} of state instead of {}; the step stays "
                              "there (quantization noise in the moments, as torchao's AdamW8bit)",
                              format_memory(plan_memory(with_8bit(in, true)).optimizer),
                              format_memory(plan_memory(with_8bit(in, false)).optimizer))},
                 cfg.train.optimizer != "adamw_8bit" && !cfg.lora() && trained > 0});
  out.push_back({{"AdamW state offloaded to the host", {"train.optimizer_offload=cpu"},
                  fmt::format("~{:.0f} ms a step for {:.2f}B parameters ({:.0f} bytes each over PCIe at 20 GB/s{}, the "
                              "host AdamW step at 10 GB/s); 16 bytes a parameter of host memory",
                              offload_ms, params / 1e9, pcie_bytes,
                              world == 1 ? " after backward: the gradients go during it" : "")},
                 cfg.train.optimizer_offload != "cpu" && !cfg.lora()});
  for (const int64_t gpus : {2, 4, 8}) {
    if (gpus <= world) continue;
    Candidate c{{fmt::format("ZeRO-1 over {} GPUs", gpus), {"distributed.shard_optimizer=true"},
                 fmt::format("{} GPUs; each step all-reduces the gradients and broadcasts the updated weights", gpus)},
                !cfg.lora()};
    c.lever.world_size = gpus;
    out.push_back(c);
  }
  const std::string base = in.amp == c10::kHalf ? "float16" : "bfloat16";  // the run's 16-bit dtype, if it has one
  Candidate lora{{"LoRA rank 16 on c_attn, c_proj and c_fc, base in " + base,
                  {"model.lora.rank=16", "model.lora.targets=[\"c_attn\",\"c_proj\",\"c_fc\"]",
                   "model.lora.base_dtype=" + base, "amp.dtype=" + base},
                  "trains low-rank adapters only: less capacity than a full fine-tune"},
                 !cfg.lora() && in.cuda};
  lora.lever.keeps_full_fine_tune = false;
  lora.lever.resumable = false;  // another set of trained parameters
  out.push_back(lora);
  Candidate freeze{{fmt::format("freeze the first {} blocks and the embeddings", L / 2),
                    {fmt::format("model.freeze_blocks={}", L / 2), "model.freeze_embeddings=true"},
                    "those layers do not adapt"},
                   !cfg.lora() && L >= 2 && cfg.model.freeze_blocks < L / 2};
  freeze.lever.keeps_full_fine_tune = false;
  out.push_back(freeze);
  Candidate shorter{{fmt::format("shorter samples: data.seq_len {}", T / 2), {fmt::format("data.seq_len={}", T / 2)},
                     "half the context per sample"},
                    T >= 64};
  shorter.lever.keeps_full_fine_tune = false;
  shorter.lever.resumable = false;  // other samples: the data position means nothing in them
  out.push_back(shorter);
  for (Candidate& c : out) c.lever.world_size = std::max(c.lever.world_size, world);  // ZeRO-1's are larger
  return out;
}

nlohmann::json lever_json(const MemoryLever& l) {
  return {{"name", l.name},
          {"settings", l.settings},
          {"new_run_settings", l.new_run_settings},
          {"resumable", l.resumable && l.new_run_settings.empty()},
          {"cost", l.cost},
          {"keeps_full_fine_tune", l.keeps_full_fine_tune},
          {"gpus", l.world_size},
          {"peak", l.peak},
          {"largest_micro_batch", l.largest_micro_batch},
          {"micro_batch", l.micro_batch}};
}

}  // namespace

bool lever_fits(const MemoryLever& lever, int64_t micro) {
  return lever.largest_micro_batch >= (lever.micro_batch > 0 ? lever.micro_batch : micro);
}

MemoryAdvice memory_levers(const TrainConfig& cfg, int64_t world, int64_t micro, int64_t budget) {
  MemoryAdvice advice;
  advice.micro_batch = micro;
  advice.budget = budget;
  std::vector<Candidate> all = candidates(cfg, world, micro, budget);
  const int64_t now = plan_memory(memory_plan_input(cfg, world)).peak(micro);
  std::vector<MemoryLever> fitting, helping;
  for (Candidate& c : all) {
    if (!c.applies) continue;
    evaluate(c.lever, cfg, micro, budget);
    if (lever_fits(c.lever, micro)) fitting.push_back(c.lever);
    else if (c.lever.peak < now) helping.push_back(c.lever);  // only what helps
  }
  // Every single lever that fits, cheapest first, then those that help without fitting.
  advice.single = fitting;
  advice.single.insert(advice.single.end(), helping.begin(), helping.end());
  const auto recommend = [&](const MemoryLever& alone) {
    advice.combined = alone;
    if (!alone.resumable) {
      advice.combined.new_run_settings = alone.settings;
      advice.combined.settings.clear();
    }
    advice.combined_fits = true;
    return advice;
  };
  // The recommendation keeps the full fine-tune when anything can: the cheapest such lever that
  // fits alone, else such levers combined; only then what changes the training, alone (the
  // cheapest that fits) or added to the combination.
  for (const MemoryLever& l : fitting) {
    if (l.keeps_full_fine_tune) return recommend(l);
  }
  // Levers in order of cost until it fits; a lever of the same group (checkpointing every 2nd
  // block, then all) replaces the earlier.
  std::vector<const Candidate*> chosen;
  const auto combine = [&](const std::vector<const Candidate*>& levers) {
    MemoryLever m;
    m.world_size = world;
    for (const Candidate* c : levers) {
      m.name += (m.name.empty() ? "" : " + ") + c->lever.name;
      auto& into = c->lever.resumable ? m.settings : m.new_run_settings;
      into.insert(into.end(), c->lever.settings.begin(), c->lever.settings.end());
      m.cost += (m.cost.empty() ? "" : "; ") + c->lever.cost;
      m.world_size = std::max(m.world_size, c->lever.world_size);
      m.keeps_full_fine_tune = m.keeps_full_fine_tune && c->lever.keeps_full_fine_tune;
      m.resumable = m.resumable && c->lever.resumable;
    }
    evaluate(m, cfg, micro, budget);
    return m;
  };
  MemoryLever& combo = advice.combined;
  combo.world_size = world;
  for (const bool full : {true, false}) {
    if (!full && !advice.combined_fits && !fitting.empty()) return recommend(fitting.front());
    for (const Candidate& c : all) {
      if (!c.applies || !c.in_combination || c.lever.keeps_full_fine_tune != full || advice.combined_fits) continue;
      if (c.lever.world_size > world && combo.world_size > world) continue;  // one GPU count (ZeRO-1) only
      std::vector<const Candidate*> next;
      for (const Candidate* k : chosen) {
        if (c.group.empty() || k->group != c.group) next.push_back(k);
      }
      next.push_back(&c);
      MemoryLever m = combine(next);
      if (m.peak >= combo.peak && !chosen.empty()) continue;  // no help on top of the rest
      chosen = next;
      combo = m;
      advice.combined_fits = lever_fits(combo, micro);
    }
  }
  return advice;
}

std::string format_memory(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (std::llabs(bytes) < (int64_t{1} << 30)) return fmt::format("{:.1f} MiB", b / double(1 << 20));
  return fmt::format("{:.1f} GiB", b / double(int64_t{1} << 30));
}

std::string set_flags(const std::vector<std::string>& settings) {
  std::string out;
  for (const auto& s : settings) out += " --set " + s;
  return out;
}

std::vector<std::string> all_settings(const MemoryLever& lever) {
  std::vector<std::string> out = lever.settings;
  out.insert(out.end(), lever.new_run_settings.begin(), lever.new_run_settings.end());
  return out;
}

nlohmann::json MemoryAdvice::to_json() const {
  nlohmann::json j = {{"micro_batch", micro_batch}, {"budget", budget}, {"combined_fits", combined_fits}};
  j["levers"] = nlohmann::json::array();
  for (const auto& l : single) j["levers"].push_back(lever_json(l));
  j["recommended"] = lever_json(combined);
  return j;
}

}  // namespace gpt2ft
