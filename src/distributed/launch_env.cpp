// Launcher variables -> rank, world size, local rank and rendezvous address.
#include "gpt2ft/distributed/launch_env.h"

#include <cstdlib>

#include "gpt2ft/core/error.h"

namespace gpt2ft {
namespace {

std::optional<std::string> process_env(const std::string& name) {
  const char* v = std::getenv(name.c_str());
  if (!v) return std::nullopt;
  return std::string(v);
}

int parse_int(const std::string& name, const std::string& value, int lo, int hi) {
  std::size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != value.size() || v < lo || v > hi) {
    throw Error("environment variable " + name + "=\"" + value + "\": expected an integer in [" + std::to_string(lo) +
                ", " + std::to_string(hi) + "]; check the launcher (torchrun or srun) that started this process");
  }
  return static_cast<int>(v);
}

}  // namespace

std::string first_slurm_host(const std::string& nodelist) {
  // A host is a prefix followed by an optional [ranges] group; hosts are comma separated
  // outside brackets. The first host takes the first number of the first range.
  std::string host;
  for (std::size_t i = 0; i < nodelist.size(); ++i) {
    const char c = nodelist[i];
    if (c == ',') break;
    if (c == '[') {
      const std::size_t close = nodelist.find(']', i);
      if (close == std::string::npos) throw Error("SLURM_JOB_NODELIST=\"" + nodelist + "\": unbalanced '['");
      const std::string ranges = nodelist.substr(i + 1, close - i - 1);
      const std::size_t end = ranges.find_first_of(",-");
      host += ranges.substr(0, end);
      i = close;
      continue;
    }
    host += c;
  }
  if (host.empty()) throw Error("SLURM_JOB_NODELIST=\"" + nodelist + "\": no host name in it");
  return host;
}

LaunchEnv read_launch_env(const std::function<std::optional<std::string>(const std::string&)>& getenv_fn) {
  const auto get = getenv_fn ? getenv_fn : process_env;
  LaunchEnv env;
  auto integer = [&](const char* name, int lo, int hi, int fallback) {
    const auto v = get(name);
    return v ? parse_int(name, *v, lo, hi) : fallback;
  };
  constexpr int kMaxRanks = 1 << 20;
  if (get("RANK") && get("WORLD_SIZE")) {
    // torchrun's agent always sets TORCHELASTIC_RUN_ID; RANK/WORLD_SIZE alone come from a
    // script or another launcher.
    env.launcher = get("TORCHELASTIC_RUN_ID") || get("TORCHELASTIC_RESTART_COUNT") ? "torchrun" : "env";
    env.world_size = integer("WORLD_SIZE", 1, kMaxRanks, 1);
    env.rank = integer("RANK", 0, env.world_size - 1, 0);
    env.local_rank = integer("LOCAL_RANK", 0, kMaxRanks, 0);
    env.agent_store = get("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
    if (env.agent_store) env.store_prefix = "/worker/attempt_" + get("TORCHELASTIC_RESTART_COUNT").value_or("0");
  } else if (get("SLURM_PROCID") && get("SLURM_STEP_NUM_TASKS")) {
    // Only srun sets SLURM_STEP_NUM_TASKS: the batch script itself (which has SLURM_NTASKS
    // and SLURM_PROCID=0 too) runs as a single process instead of waiting for absent peers.
    env.launcher = "slurm";
    env.world_size = integer("SLURM_STEP_NUM_TASKS", 1, kMaxRanks, 1);
    env.rank = integer("SLURM_PROCID", 0, env.world_size - 1, 0);
    env.local_rank = integer("SLURM_LOCALID", 0, kMaxRanks, 0);
    const auto nodes = get("SLURM_STEP_NODELIST") ? get("SLURM_STEP_NODELIST") : get("SLURM_JOB_NODELIST");
    if (nodes) env.master_addr = first_slurm_host(*nodes);
    // A port of this job's own, so that jobs sharing a node do not collide.
    if (const auto job = get("SLURM_JOB_ID"))
      env.master_port = 20000 + parse_int("SLURM_JOB_ID", *job, 0, 2147483647) % 20000;
  } else if (get("WORLD_SIZE") || get("RANK")) {
    throw Error(
        "incomplete launcher environment: RANK and WORLD_SIZE must be set together (as torchrun does); "
        "unset them to train in a single process");
  }
  if (const auto addr = get("MASTER_ADDR")) env.master_addr = *addr;
  env.master_port = integer("MASTER_PORT", 1, 65535, env.master_port);
  return env;
}

c10::Device rank_device(const c10::Device& configured, const LaunchEnv& env) {
  if (env.distributed() && configured.is_cuda()) return {c10::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank)};
  return configured;
}

}  // namespace gpt2ft
