// Where this process stands in a multi-process run, as its launcher describes it.
//
//   torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
//             (+ TORCHELASTIC_USE_AGENT_STORE / TORCHELASTIC_RESTART_COUNT: the agent
//             already serves the TCPStore and every worker connects to it as a client)
//   Slurm:    SLURM_PROCID, SLURM_STEP_NUM_TASKS (an srun step's SLURM_NTASKS), SLURM_LOCALID,
//             the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST, a port derived from
//             SLURM_JOB_ID (MASTER_ADDR / MASTER_PORT override both)
//   neither:  a single process (world size 1)
#pragma once

#include <functional>
#include <optional>
#include <string>

#include <c10/core/Device.h>

namespace gpt2ft {

struct LaunchEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string launcher = "none";  // "none" | "torchrun" | "env" (RANK/WORLD_SIZE by other means) | "slurm"
  bool agent_store = false;       // torchrun's agent hosts the store: rank 0 is a client too
  std::string store_prefix;       // keys of this attempt (torchrun restarts) live under it

  bool distributed() const { return world_size > 1; }
};

// Reads the launcher's variables through `getenv` (the process environment by default).
// Inconsistent or malformed values are Errors that name the variable and its value.
LaunchEnv read_launch_env(const std::function<std::optional<std::string>(const std::string&)>& getenv = {});

// The device a rank trains on: its local rank's GPU when a launcher started several processes
// on CUDA, otherwise the configured one ("cuda:N" in one process stays GPU N).
c10::Device rank_device(const c10::Device& configured, const LaunchEnv& env);

// The first host name of a Slurm node list: "gpu[07-09,12],cpu1" -> "gpu07".
std::string first_slurm_host(const std::string& nodelist);

}  // namespace gpt2ft
