// gpt2-finetune plan --config run.json: what a training step will hold in memory, and the
// largest micro batch that fits.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "gpt2ft/core/cuda_info.h"
#include "gpt2ft/core/device.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/host_memory.h"
#include "gpt2ft/distributed/launch_env.h"
#include "gpt2ft/memory/levers.h"
#include "gpt2ft/memory/planner.h"
#include "gpt2ft/memory/run_memory.h"
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


// SIGTERM / SIGINT while measuring (plan --measure): the measuring run is ended.
volatile std::sig_atomic_t g_measure_signal = 0;
extern "C" void on_measure_signal(int signal) { g_measure_signal = signal; }

// A folder removed with everything in it when the scope ends, on every path.
struct ScratchFolder {
  fs::path path;
  explicit ScratchFolder(fs::path p) : path(std::move(p)) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~ScratchFolder() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

std::string last_line_of(const fs::path& file) {
  std::ifstream in(file);
  std::string line, last;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") != std::string::npos) last = line;
  }
  return last;
}

// Runs argv_text (this executable's `train`) with its output in `log`, waiting for it; a
// SIGTERM or SIGINT meanwhile kills it at once and ends plan with exit 76. A failed run is an
// Error carrying its last log line.
void run_measuring_child(std::vector<std::string> argv_text, const fs::path& log, int64_t micro) {
  const std::string& exe = argv_text.front();
  std::vector<char*> argv;
  for (auto& a : argv_text) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  struct sigaction stop {}, old_term {}, old_int {};
  stop.sa_handler = on_measure_signal;
  sigemptyset(&stop.sa_mask);
  g_measure_signal = 0;
  sigaction(SIGTERM, &stop, &old_term);
  sigaction(SIGINT, &stop, &old_int);
  pid_t child = 0;
  const int spawned = posix_spawn(&child, exe.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  int status = 0;
  if (spawned == 0) {
    while (waitpid(child, &status, WNOHANG) == 0) {
      if (g_measure_signal != 0) {
        kill(child, SIGKILL);
        waitpid(child, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  sigaction(SIGTERM, &old_term, nullptr);
  sigaction(SIGINT, &old_int, nullptr);
  if (spawned != 0) throw Error("plan --measure: cannot start " + exe + ": " + std::strerror(spawned));
  if (g_measure_signal != 0) {
    throw ExitRequest(kExitStopped, "plan --measure: stopped by " + std::string(strsignal(g_measure_signal)) +
                                        "; the measuring run was ended and its folder removed");
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw Error("plan --measure: the measuring run (micro batch " + std::to_string(micro) + ") failed" +
                (WIFEXITED(status) ? " with exit " + std::to_string(WEXITSTATUS(status))
                                   : " by signal " + std::to_string(WTERMSIG(status))) +
                ": " + last_line_of(log));
  }
}

// The peak memory the measuring run logged last (metrics.jsonl `file`): on CUDA the caching
// allocator's, on the CPU the counting allocator's with each phase's.
nlohmann::json measured_peak(const fs::path& file, c10::Device device) {
  std::ifstream metrics(file);
  std::string line, last;
  while (std::getline(metrics, line)) {
    if (line.find("peak_allocated_gb") != std::string::npos) last = line;
  }
  if (last.empty()) throw Error("plan --measure: the measuring run logged no peak memory");
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

// Three real training steps at `micro` on the config's device, in a child process (this
// executable's `train`, its log kept apart from plan's report): the peak memory they used (on
// CUDA the caching allocator's, on the CPU the counting allocator's, with each phase's peak).
// On the CPU without cpu.memory_limit a predicted peak beyond the machine's available memory
// is refused: measuring it would take the machine down. SIGTERM or SIGINT ends the child at
// once; the scratch folder goes on every path.
nlohmann::json measure_peak(const TrainConfig& cfg, int64_t micro, int64_t predicted) {
  const c10::Device device = parse_device(cfg.device, "device");
  if (!device.is_cuda() && cfg.cpu.memory_limit.empty()) {
    const int64_t available = host_available_bytes();
    if (available > 0 && predicted > available) {
      throw Error("plan --measure: the predicted peak at micro batch " + std::to_string(micro) + " is " +
                  format_memory(predicted) + ", more than this machine's available memory (" +
                  format_memory(available) + "); measuring it would take the machine down. Measure a micro batch "
                  "that fits (--set train.micro_batch_size=N), or under a cap (--set cpu.memory_limit=" +
                  fmt::format("{}MiB", available / 2 >> 20) + "), where running out ends in an error, not a crash");
    }
  }
  const ScratchFolder dir(fs::temp_directory_path() / ("gpt2ft-plan-" + std::to_string(::getpid())));
  TrainConfig m = TrainConfig::parse(
      cfg.to_json(), {"train.max_steps=3", "train.micro_batch_size=" + std::to_string(micro), "checkpoint.resume=none",
                      "checkpoint.at_end=false", "data.val=", "checkpoint.keep_best=false",
                      "eval.early_stopping_patience=0", "log.every_steps=1", "log.progress=lines",
                      "output_dir=" + (dir.path / "run").string()});
  m.train.epochs = 0;
  const fs::path config = dir.path / "run.json", log = dir.path / "train.log";
  {
    std::ofstream out(config);
    out << m.to_json().dump(2) << "\n";
  }
  run_measuring_child({fs::read_symlink("/proc/self/exe").string(), "train", "--config", config.string(),
                       "--no-final-model"},
                      log, micro);
  return measured_peak(dir.path / "run" / "metrics.jsonl", device);
}

std::string mem(int64_t bytes) { return format_memory(bytes); }

// The first lines: whether the micro batch fits, and what the budget is and where it came from.
void print_verdict(const MemoryPlan& plan, int64_t micro, int64_t budget, const std::string& budget_source) {
  if (budget <= 0) {
    std::printf("peak at micro batch %lld: %s (no budget to judge it against: %s)\n", static_cast<long long>(micro),
                mem(plan.peak(micro)).c_str(), budget_source.c_str());
    return;
  }
  const int64_t peak = plan.peak(micro);
  std::string need = mem(peak), have = mem(budget);
  if (need == have) {  // close: enough digits to tell them apart
    need = fmt::format("{:.3f} GiB", static_cast<double>(peak) / double(int64_t{1} << 30));
    have = fmt::format("{:.3f} GiB", static_cast<double>(budget) / double(int64_t{1} << 30));
  }
  if (peak <= budget) {
    std::printf("fits: %s of %s at micro batch %lld\n", need.c_str(), have.c_str(), static_cast<long long>(micro));
  } else {
    std::printf("does not fit: micro batch %lld needs %s of %s\n", static_cast<long long>(micro), need.c_str(),
                have.c_str());
  }
  std::printf("budget: %s\n\n", budget_source.c_str());
}

void print_plan(const TrainConfig& cfg, const MemoryPlanInput& input, const MemoryPlan& plan, int64_t micro,
                int64_t budget, const nlohmann::json& out) {
  const auto row = [](const char* what, int64_t bytes, const std::string& note = "") {
    std::printf("  %-30s %12s%s\n", what, mem(bytes).c_str(), note.empty() ? "" : ("  (" + note + ")").c_str());
  };
  std::printf("memory plan: %s, T=%lld, amp %s, activation checkpointing %s\n",
              cfg.model.init_from.empty() ? cfg.model.preset.c_str() : cfg.model.init_from.c_str(),
              static_cast<long long>(cfg.data.seq_len), cfg.amp.dtype.c_str(), cfg.model.activation_checkpointing.c_str());
  row("weights", plan.weights);
  row("gradients", plan.gradients, "held from the first micro batch when accumulating");
  if (plan.host_bytes > 0) {
    row("optimizer state (AdamW)", plan.optimizer, "offloaded: " + mem(plan.host_bytes) + " of host memory");
  } else if (input.optimizer_8bit) {
    row("optimizer state (8-bit)", plan.optimizer, "codes, block scales, float32 moments of small tensors");
  } else {
    row("optimizer state (AdamW)", plan.optimizer);
  }
  row("AMP weight copies", plan.amp_copies);
  if (input.cuda) row("cuBLAS workspaces", plan.workspace, "forward's and autograd's threads");
  if (plan.gradient_buckets > 0) {
    row(fmt::format("gradient buckets ({} GPUs)", input.world_size).c_str(), plan.gradient_buckets);
  }
  if (plan.reference > 0) row("DPO reference weights", plan.reference, "dpo.reference \"" + cfg.dpo.reference + "\"");
  if (plan.loss_workspace > 0) row("chunked loss workspace", plan.loss_workspace);
  // DPO: a micro batch counts pairs, each two rows (the terms below are per pair).
  const std::string unit = input.sequences_per_sample == 2 ? "pair" : "sequence";
  row(("activations per " + unit).c_str(), plan.activations_per_sequence,
      "no checkpointing " + mem(plan.activations_per_sequence_no_checkpointing) + ", all blocks " +
          mem(plan.activations_per_sequence_all_checkpointed));
  row(("logits and loss per " + unit).c_str(), plan.logits_per_sequence);
  row(("backward buffers per " + unit).c_str(), plan.backward_per_sequence);
  if (plan.reference_per_sequence > 0) {
    row("DPO reference pass per pair", plan.reference_per_sequence,
        "dpo.reference \"" + cfg.dpo.reference + "\", no gradients");
  }
  row(fmt::format("peak at micro batch {}", micro).c_str(), plan.peak(micro),
      "forward end " + mem(plan.forward_peak(micro)) + ", backward " + mem(plan.backward_peak(micro)) +
          (plan.first_recompute_per_sequence > 0
               ? ", first checkpointed block recomputed " + mem(plan.first_recompute_peak(micro))
               : std::string()) +
          ", backward end " + mem(plan.backward_end_peak(micro)));
  if (budget > 0) {
    const int64_t largest = plan.largest_micro_batch(budget);
    std::printf("  largest micro batch in %s: %lld\n", mem(budget).c_str(), static_cast<long long>(largest));
    const int64_t accumulating = plan.largest_accumulating_micro_batch(budget);
    if (largest > accumulating + 1) {  // smaller micro batches hold the gradients between them
      std::printf("    that is the whole batch (no gradients held between micro batches); with accumulation the "
                  "largest is %lld\n", static_cast<long long>(accumulating));
    }
  }
  if (out.contains("measured_peak_allocated")) {
    const auto measured = out["measured_peak_allocated"].get<int64_t>();
    std::printf("  measured peak allocated        %12s  (predicted %s, %+.1f%%)\n", mem(measured).c_str(),
                mem(plan.peak(micro)).c_str(),
                100.0 * static_cast<double>(plan.peak(micro) - measured) / static_cast<double>(measured));
    if (out.contains("measured_peak_by_phase")) {
      std::string phases;
      for (const auto& [phase, bytes] : out["measured_peak_by_phase"].items()) {
        phases += (phases.empty() ? "" : ", ") + phase + " " + mem(bytes.get<int64_t>());
      }
      std::printf("    measured peak by phase: %s\n", phases.c_str());
    }
  }
}

void print_advice(const MemoryAdvice& advice) {
  std::printf("\nmicro batch %lld does not fit %s; levers, cheapest first (those that fit alone first):\n",
              static_cast<long long>(advice.micro_batch), mem(advice.budget).c_str());
  for (const auto& l : advice.single) {
    const bool fits = lever_fits(l, advice.micro_batch);
    std::printf("  %-52s %s: peak %s%s, largest micro batch %lld%s\n      cost: %s\n", l.name.c_str(),
                fits ? "fits" : "short", mem(l.peak).c_str(),
                l.micro_batch > 0 ? fmt::format(" at micro batch {}", l.micro_batch).c_str() : "",
                static_cast<long long>(l.largest_micro_batch),
                !l.resumable ? " (a new run)" : l.keeps_full_fine_tune ? "" : " (changes what is trained)",
                l.cost.c_str());
  }
  const MemoryLever& c = advice.combined;
  std::string how = c.settings.empty() ? "" : "  resumes a run's checkpoint:" + set_flags(c.settings) + "\n";
  if (!c.new_run_settings.empty()) {
    how += "  a new run (other samples or another trained set; from a checkpoint's weights with --set "
           "model.init_from=CHECKPOINT in another output_dir):" + set_flags(c.new_run_settings) + "\n";
  }
  if (c.world_size > 1) how += "  on " + std::to_string(c.world_size) + " GPUs\n";
  std::printf("recommended%s: %s\n  peak %s at micro batch %lld, largest micro batch %lld\n%s",
              advice.combined_fits ? "" : " (still short)", c.name.c_str(), mem(c.peak).c_str(),
              static_cast<long long>(c.micro_batch > 0 ? c.micro_batch : advice.micro_batch),
              static_cast<long long>(c.largest_micro_batch), how.c_str());
}

int run_plan(const PlanArgs& args) {
  TrainConfig cfg = TrainConfig::from_file(args.config, args.overrides);
  const int64_t world = args.gpus > 0 ? args.gpus : read_launch_env().world_size;
  int64_t budget = 0;
  std::string budget_source;
  if (!args.gpu_memory.empty()) {
    const int64_t gpu = parse_memory_size(args.gpu_memory, "--gpu-memory");
    if (gpu < (int64_t{1} << 30)) {  // the CUDA context alone takes more; a mistyped unit, not a GPU
      throw Error("--gpu-memory: \"" + args.gpu_memory + "\" is less than 1 GiB, and no GPU a training step can run on "
                  "is that small; give the GPU's memory, e.g. 24GiB or 80GB");
    }
    budget = plannable_of(gpu);
    // 16GB and 16GiB differ by 7%: say which was read.
    budget_source = fmt::format("--gpu-memory {} = {}, less 1 GiB for the CUDA context and 5% for the allocator: {} "
                                "usable", args.gpu_memory, format_memory(gpu), format_memory(budget));
  } else {
    const c10::Device device = parse_device(cfg.device, "device");
    budget = plannable_memory(cfg, device);
    budget_source = describe_plannable_memory(cfg, device);
  }
  const BatchSplit split = batch_split_of(cfg, world);
  if (cfg.checkpointing_auto() && budget > 0) {  // as the trainer resolves it
    const int64_t target = split.micro > 0 ? split.micro : std::min<int64_t>(split.per_rank(), 8);
    const int64_t every = least_checkpointing_that_fits(memory_plan_input(cfg, world), target, budget).value_or(1);
    cfg.model.activation_checkpointing = every == 0 ? "none" : every == 1 ? "all" : std::to_string(every);
  }
  const MemoryPlanInput input = memory_plan_input(cfg, world);
  const MemoryPlan plan = plan_memory(input);
  const int64_t micro = !cfg.micro_batch_auto()  ? cfg.train.micro_batch_size
                        : split.auto_accumulation ? std::clamp<int64_t>(plan.largest_accumulating_micro_batch(budget), 1,
                                                                        kAutoMicroBatchCap)
                                                  : std::max<int64_t>(1, plan.largest_micro_batch(budget));
  nlohmann::json out = plan.to_json(budget);
  out["world_size"] = input.world_size;
  out["micro_batch"] = micro;
  out["predicted_peak"] = plan.peak(micro);
  out["activation_checkpointing"] = cfg.model.activation_checkpointing;
  out["budget_source"] = budget_source;
  out["fits"] = budget > 0 && plan.peak(micro) <= budget;
  // Advice when the micro batch does not fit (for "auto": when fewer than 4 would).
  const int64_t wanted = !cfg.micro_batch_auto()  ? micro
                         : split.auto_accumulation ? 1
                                                   : std::min<int64_t>(4, split.per_rank());
  std::optional<MemoryAdvice> advice;
  if (budget > 0 && plan.largest_micro_batch(budget) < wanted) {
    advice = memory_levers(cfg, world, wanted, budget);
    out["advice"] = advice->to_json();
  }
  if (args.measure) out.update(measure_peak(cfg, micro, plan.peak(micro)));
  if (args.json) {
    std::cout << out.dump() << std::endl;
    return kExitOk;
  }
  print_verdict(plan, micro, budget, budget_source);
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
