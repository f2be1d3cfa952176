// The levers `plan` proposes.
#include "gpt2ft/memory/levers.h"

#include <algorithm>
#include <cstdlib>

#include <fmt/format.h>

#include "gpt2ft/core/autocast.h"
#include "gpt2ft/memory/planner.h"
#include "gpt2ft/memory/run_memory.h"

namespace gpt2ft {
namespace {

// Rough rates for the offload cost: PCIe (one direction) and host memory bandwidth.
constexpr double kPcieBytesPerS = 20e9, kHostBytesPerS = 10e9;

struct Candidate {
  MemoryLever lever;
  bool applies = true;
  bool in_combination = true;  // false: a milder form of a lever the combination takes instead
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
  lever.peak = plan.peak(micro);
  lever.largest_micro_batch = plan.largest_micro_batch(budget);
}

std::vector<Candidate> candidates(const TrainConfig& cfg, int64_t world) {
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
  out.push_back({{"bf16 autocast", {"amp.dtype=bfloat16"}, "none on Ampere and newer GPUs (usually faster)"},
                 !autocast && in.cuda});
  out.push_back({{"activation checkpointing, every 2nd block", {"model.activation_checkpointing=2"},
                  "about 17% more compute (half the blocks run forward twice)"},
                 every == 0 || every > 2,
                 /*in_combination=*/false});  // "all" follows if needed
  out.push_back({{"activation checkpointing, all blocks", {"model.activation_checkpointing=all"},
                  "about 33% more compute (one extra forward pass)"},
                 every != 1});
  const int64_t trained = plan_memory(in).gradients / 4;
  // fused_adamw "on" names AdamW's kernel, which the trainer refuses beside 8-bit AdamW's own step.
  std::vector<std::string> eight_bit = {"train.optimizer=adamw_8bit"};
  if (cfg.train.fused_adamw == "on") eight_bit.push_back("train.fused_adamw=auto");
  out.push_back({{"8-bit AdamW", eight_bit,
                  fmt::format("the moments in 8-bit blocks on the GPU: {:.2f} GiB of state instead of {:.2f} GiB; the "
                              "step stays on the GPU (quantization noise in the moments, as torchao's AdamW8bit)",
                              plan_memory(with_8bit(in, true)).optimizer / double(1ll << 30),
                              plan_memory(with_8bit(in, false)).optimizer / double(1ll << 30))},
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
  Candidate lora{{"LoRA rank 16 on c_attn, c_proj and c_fc, base in bfloat16",
                  {"model.lora.rank=16", "model.lora.targets=[\"c_attn\",\"c_proj\",\"c_fc\"]",
                   "model.lora.base_dtype=bfloat16", "amp.dtype=bfloat16"},
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
          {"largest_micro_batch", l.largest_micro_batch}};
}

}  // namespace

MemoryAdvice memory_levers(const TrainConfig& cfg, int64_t world, int64_t micro, int64_t budget) {
  MemoryAdvice advice;
  advice.micro_batch = micro;
  advice.budget = budget;
  std::vector<Candidate> all = candidates(cfg, world);
  const int64_t now = plan_memory(memory_plan_input(cfg, world)).peak(micro);
  for (Candidate& c : all) {
    if (!c.applies) continue;
    evaluate(c.lever, cfg, micro, budget);
    if (c.lever.peak < now) advice.single.push_back(c.lever);  // only what helps
  }
  // The combination: full-fine-tune levers in order of cost, then the others, until it fits.
  MemoryLever& combo = advice.combined;
  combo.world_size = world;
  for (const bool full : {true, false}) {
    for (const Candidate& c : all) {
      if (!c.applies || !c.in_combination || c.lever.keeps_full_fine_tune != full || advice.combined_fits) continue;
      if (c.lever.world_size > world && combo.world_size > world) continue;  // one GPU count (ZeRO-1) only
      MemoryLever next = combo;
      next.name += (next.name.empty() ? "" : " + ") + c.lever.name;
      auto& into = c.lever.resumable ? next.settings : next.new_run_settings;
      into.insert(into.end(), c.lever.settings.begin(), c.lever.settings.end());
      next.cost += (next.cost.empty() ? "" : "; ") + c.lever.cost;
      next.world_size = std::max(next.world_size, c.lever.world_size);
      next.keeps_full_fine_tune = combo.keeps_full_fine_tune && c.lever.keeps_full_fine_tune;
      evaluate(next, cfg, micro, budget);
      if (next.peak >= combo.peak && !combo.name.empty()) continue;  // no help on top of the rest
      combo = next;
      advice.combined_fits = combo.largest_micro_batch >= micro;
    }
  }
  return advice;
}

std::string format_memory(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (std::llabs(bytes) < (int64_t{1} << 30)) return fmt::format("{:.1f} MiB", b / double(1 << 20));
  return fmt::format("{:.1f} GiB", b / double(int64_t{1} << 30));
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
