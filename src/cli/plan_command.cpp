// gpt2-finetune plan --config run.json: what a training step will hold in memory, and the
// largest micro batch that fits.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "gpt2ft/core/cuda_info.h"
#include "gpt2ft/core/device.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/distributed/launch_env.h"
#include "gpt2ft/memory/levers.h"
#include "gpt2ft/memory/planner.h"
#include "gpt2ft/train/config.h"
#include "gpt2ft/train/trainer.h"

namespace gpt2ft::cli {
namespace fs = std::filesystem;

namespace {

struct PlanArgs {
  std::string config, gpu_memory;
  std::vector<std::string> overrides;
  bool json = false, measure = false;
  int64_t gpus = 0;
};

double gib(int64_t bytes) { return static_cast<double>(bytes) / double(1ll << 30); }

// Three real training steps at `micro` on the config's device: the peak memory they used (on
// CUDA the caching allocator's, on the CPU the counting allocator's, with each phase's peak).
nlohmann::json measure_peak(const TrainConfig& cfg, int64_t micro) {
  const c10::Device device = parse_device(cfg.device, "device");
  const fs::path dir = fs::temp_directory_path() / ("gpt2ft-plan-" + std::to_string(::getpid()));
  TrainConfig m = TrainConfig::parse(
      cfg.to_json(), {"train.max_steps=3", "train.micro_batch_size=" + std::to_string(micro), "checkpoint.resume=none",
                      "checkpoint.at_end=false", "data.val=", "checkpoint.keep_best=false",
                      "eval.early_stopping_patience=0", "log.every_steps=1", "output_dir=" + dir.string()});
  m.train.epochs = 0;
  RunEnd end;
  end.save_final_model = false;  // three steps to measure, not a model anyone asked for
  run_training(m, end);
  std::ifstream metrics(dir / "metrics.jsonl");
  std::string line, last;
  while (std::getline(metrics, line)) {
    if (line.find("peak_allocated_gb") != std::string::npos) last = line;
  }
  fs::remove_all(dir);
  const auto row = nlohmann::json::parse(last);
  if (!device.is_cuda()) {
    nlohmann::json phases;
    for (const auto& [phase, gb] : row["cpu_peak_by_phase_gb"].items()) phases[phase] = static_cast<int64_t>(gb.get<double>() * 1e9);
    return {{"measured_peak_allocated", static_cast<int64_t>(row["cpu_peak_allocated_gb"].get<double>() * 1e9)},
            {"measured_peak_by_phase", phases},
            {"measured_on", "cpu (counting allocator)"}};
  }
  return {{"measured_peak_allocated", static_cast<int64_t>(row["cuda_peak_allocated_gb"].get<double>() * 1e9)},
          {"measured_peak_reserved", static_cast<int64_t>(row["cuda_peak_reserved_gb"].get<double>() * 1e9)},
          {"measured_on", "cuda (caching allocator)"}};
}

void print_plan(const TrainConfig& cfg, const MemoryPlanInput& input, const MemoryPlan& plan, int64_t micro,
                int64_t budget, const nlohmann::json& out) {
  std::printf("memory plan: %s, T=%lld, amp %s, activation checkpointing %s\n",
              cfg.model.init_from.empty() ? cfg.model.preset.c_str() : cfg.model.init_from.c_str(),
              static_cast<long long>(cfg.data.seq_len), cfg.amp.dtype.c_str(), cfg.model.activation_checkpointing.c_str());
  std::printf("  weights                     %9.3f GiB\n", gib(plan.weights));
  std::printf("  gradients                   %9.3f GiB  (held from the first micro batch when accumulating)\n",
              gib(plan.gradients));
  if (plan.host_bytes > 0) {
    std::printf("  optimizer state (AdamW)     %9.3f GiB  (offloaded: %.3f GiB of host memory)\n", gib(plan.optimizer),
                gib(plan.host_bytes));
  } else if (input.optimizer_8bit) {
    std::printf("  optimizer state (8-bit)     %9.3f GiB  (codes, block scales, float32 moments of small tensors)\n",
                gib(plan.optimizer));
  } else {
    std::printf("  optimizer state (AdamW)     %9.3f GiB\n", gib(plan.optimizer));
  }
  std::printf("  AMP weight copies           %9.3f GiB\n", gib(plan.amp_copies));
  std::printf("  cuBLAS workspace            %9.3f GiB\n", gib(plan.workspace));
  if (plan.gradient_buckets > 0) {
    std::printf("  gradient buckets (%lld GPUs) %8.3f GiB\n", static_cast<long long>(input.world_size),
                gib(plan.gradient_buckets));
  }
  if (plan.reference > 0) std::printf("  DPO reference copy          %9.3f GiB  (dpo.reference \"model\")\n", gib(plan.reference));
  if (plan.loss_workspace > 0) std::printf("  chunked loss workspace      %9.3f GiB\n", gib(plan.loss_workspace));
  // DPO: a micro batch counts pairs, each two rows (the terms below are per pair).
  const char* unit = input.sequences_per_sample == 2 ? "pair    " : "sequence";
  std::printf("  activations per %s    %9.3f GiB  (no checkpointing %.3f, all blocks %.3f)\n", unit,
              gib(plan.activations_per_sequence), gib(plan.activations_per_sequence_no_checkpointing),
              gib(plan.activations_per_sequence_all_checkpointed));
  std::printf("  logits and loss per %s %8.3f GiB\n", unit, gib(plan.logits_per_sequence));
  std::printf("  backward buffers per %s %7.3f GiB\n", unit, gib(plan.backward_per_sequence));
  if (plan.reference_per_sequence > 0) {
    std::printf("  DPO reference pass per pair %9.3f GiB  (dpo.reference \"%s\", no gradients)\n",
                gib(plan.reference_per_sequence), cfg.dpo.reference.c_str());
  }
  std::printf("  peak at micro batch %-4lld    %9.3f GiB  (forward end %.3f, backward %.3f, %sbackward end %.3f)\n",
              static_cast<long long>(micro), gib(plan.peak(micro)), gib(plan.forward_peak(micro)),
              gib(plan.backward_peak(micro)),
              plan.first_recompute_per_sequence > 0
                  ? fmt::format("first checkpointed block recomputed {:.3f}, ", gib(plan.first_recompute_peak(micro))).c_str()
                  : "",
              gib(plan.backward_end_peak(micro)));
  if (budget > 0) {
    const int64_t largest = plan.largest_micro_batch(budget);
    std::printf("  largest micro batch in %.1f GiB usable: %lld  (the GPU's memory less 1 GiB for the CUDA context, "
                "less 5%%)\n", gib(budget), static_cast<long long>(largest));
    const int64_t accumulating = plan.largest_accumulating_micro_batch(budget);
    if (largest > accumulating + 1) {  // smaller micro batches hold the gradients between them
      std::printf("    that is the whole batch (no gradients held between micro batches); with accumulation the "
                  "largest is %lld\n", static_cast<long long>(accumulating));
    }
  }
  if (out.contains("measured_peak_allocated")) {
    const double measured = out["measured_peak_allocated"].get<double>();
    std::printf("  measured peak allocated     %9.3f GiB (predicted %.3f, %+.1f%%)\n", measured / double(1ll << 30),
                gib(plan.peak(micro)), 100.0 * (static_cast<double>(plan.peak(micro)) - measured) / measured);
    if (out.contains("measured_peak_by_phase")) {
      std::string phases;
      for (const auto& [phase, bytes] : out["measured_peak_by_phase"].items()) {
        phases += (phases.empty() ? "" : ", ") + phase + " " + fmt::format("{:.3f}", gib(bytes.get<int64_t>()));
      }
      std::printf("    measured peak by phase (GiB): %s\n", phases.c_str());
    }
  }
}

void print_advice(const MemoryAdvice& advice) {
  std::printf("\nmicro batch %lld does not fit %.1f GiB; levers that would help, cheapest first:\n",
              static_cast<long long>(advice.micro_batch), gib(advice.budget));
  for (const auto& l : advice.single) {
    std::printf("  %-52s peak %7.2f GiB, largest micro batch %lld%s\n      cost: %s\n", l.name.c_str(), gib(l.peak),
                static_cast<long long>(l.largest_micro_batch),
                !l.resumable ? " (a new run)" : l.keeps_full_fine_tune ? "" : " (changes what is trained)",
                l.cost.c_str());
  }
  const MemoryLever& c = advice.combined;
  const auto sets = [](const std::vector<std::string>& settings) {
    std::string out;
    for (const auto& s : settings) out += " --set " + s;
    return out;
  };
  std::string how = c.settings.empty() ? "" : "  resumes a run's checkpoint:" + sets(c.settings) + "\n";
  if (!c.new_run_settings.empty()) {
    how += "  a new run (other samples or another trained set; from a checkpoint's weights with --set "
           "model.init_from=CHECKPOINT in another output_dir):" + sets(c.new_run_settings) + "\n";
  }
  if (c.world_size > 1) how += "  on " + std::to_string(c.world_size) + " GPUs\n";
  std::printf("recommended%s: %s\n  peak %.2f GiB at micro batch %lld, largest micro batch %lld\n%s",
              advice.combined_fits ? "" : " (still short)", c.name.c_str(), gib(c.peak),
              static_cast<long long>(advice.micro_batch), static_cast<long long>(c.largest_micro_batch), how.c_str());
}

int run_plan(const PlanArgs& args) {
  TrainConfig cfg = TrainConfig::from_file(args.config, args.overrides);
  const int64_t world = args.gpus > 0 ? args.gpus : read_launch_env().world_size;
  int64_t budget = 0;
  if (!args.gpu_memory.empty()) {
    const int64_t gpu = parse_memory_size(args.gpu_memory, "--gpu-memory");
    if (gpu < (int64_t{1} << 30)) {  // the CUDA context alone takes more; a mistyped unit, not a GPU
      throw Error("--gpu-memory: \"" + args.gpu_memory + "\" is less than 1 GiB, and no GPU a training step can run on "
                  "is that small; give the GPU's memory, e.g. 24GiB or 80GB");
    }
    budget = plannable_of(gpu);
  } else {
    const c10::Device device = parse_device(cfg.device, "device");
    if (device.is_cuda() || !cfg.cpu.memory_limit.empty()) budget = plannable_memory(cfg, device);
  }
  const BatchSplit split = batch_split_of(cfg, world);
  if (cfg.checkpointing_auto() && budget > 0) {  // as the trainer resolves it
    const int64_t target = split.micro > 0 ? split.micro : std::min<int64_t>(split.per_rank(), 8);
    const int64_t every = least_checkpointing_that_fits(memory_plan_input(cfg, world), target, budget).value_or(1);
    cfg.model.activation_checkpointing = every == 0 ? "none" : every == 1 ? "all" : std::to_string(every);
  }
  const MemoryPlanInput input = memory_plan_input(cfg, world);
  const MemoryPlan plan = plan_memory(input);
  const int64_t micro = cfg.micro_batch_auto() ? std::max<int64_t>(1, plan.largest_micro_batch(budget))
                                               : cfg.train.micro_batch_size;
  nlohmann::json out = plan.to_json(budget);
  out["world_size"] = input.world_size;
  out["micro_batch"] = micro;
  out["predicted_peak"] = plan.peak(micro);
  out["activation_checkpointing"] = cfg.model.activation_checkpointing;
  // Advice when the micro batch does not fit (for "auto": when fewer than 4 would).
  const int64_t wanted = cfg.micro_batch_auto() ? std::min<int64_t>(4, split.per_rank()) : micro;
  std::optional<MemoryAdvice> advice;
  if (budget > 0 && plan.largest_micro_batch(budget) < wanted) {
    advice = memory_levers(cfg, world, wanted, budget);
    out["advice"] = advice->to_json();
  }
  if (args.measure) out.update(measure_peak(cfg, micro));
  if (args.json) {
    std::cout << out.dump() << std::endl;
    return kExitOk;
  }
  print_plan(cfg, input, plan, micro, budget, out);
  if (advice) print_advice(*advice);
  return kExitOk;
}

}  // namespace

void add_plan_command(CLI::App& app, Runner& run) {
  auto args = std::make_shared<PlanArgs>();
  CLI::App* cmd = app.add_subcommand("plan", "Predict a training step's peak memory and the largest micro batch that fits");
  cmd->add_option("--config", args->config, "Training config JSON")->required();
  cmd->add_option("--set", args->overrides, "Override a config option (repeatable)")->take_all();
  cmd->add_option("--gpu-memory", args->gpu_memory,
                  "The GPU's memory, e.g. 24GiB (default: the device's, or cuda.memory_limit)");
  cmd->add_option("--gpus", args->gpus, "Data-parallel GPUs the run will use (default: the launcher's world size, else 1)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  cmd->add_flag("--json", args->json, "Print the plan as one JSON object");
  cmd->add_flag("--measure", args->measure,
                "Run 3 real steps and print measured vs predicted peak (on the CPU: the counting allocator's, by phase)");
  cmd->callback([args, &run] { run = [args] { return run_plan(*args); }; });
}

}  // namespace gpt2ft::cli
