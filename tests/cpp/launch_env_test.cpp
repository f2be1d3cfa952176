// The launcher environment: torchrun's and srun's variables, Slurm node lists, and the errors
// for inconsistent values. Expected first hosts follow Slurm's hostlist format (what
// `scontrol show hostnames` prints first).
#include "gpt2ft/distributed/launch_env.h"

#include <gtest/gtest.h>

#include <map>

#include "gpt2ft/core/error.h"

namespace gpt2ft {
namespace {

LaunchEnv read(const std::map<std::string, std::string>& vars) {
  return read_launch_env([&](const std::string& name) -> std::optional<std::string> {
    const auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  });
}

TEST(LaunchEnv, NoLauncherIsOneProcess) {
  const LaunchEnv env = read({});
  EXPECT_EQ(env.world_size, 1);
  EXPECT_EQ(env.rank, 0);
  EXPECT_FALSE(env.distributed());
  EXPECT_EQ(env.launcher, "none");
}

TEST(LaunchEnv, RankAndWorldSizeWithoutTorchrunAreNotCalledTorchrun) {
  const LaunchEnv env = read({{"RANK", "1"}, {"WORLD_SIZE", "2"}});
  EXPECT_EQ(env.launcher, "env");
  EXPECT_EQ(env.rank, 1);
  EXPECT_EQ(env.world_size, 2);
  EXPECT_EQ(read({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"TORCHELASTIC_RUN_ID", "abc"}}).launcher, "torchrun");
}

TEST(LaunchEnv, Torchrun) {
  const LaunchEnv env = read({{"RANK", "3"},
                              {"WORLD_SIZE", "8"},
                              {"LOCAL_RANK", "1"},
                              {"MASTER_ADDR", "node7"},
                              {"MASTER_PORT", "29400"},
                              {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                              {"TORCHELASTIC_RESTART_COUNT", "2"}});
  EXPECT_EQ(env.launcher, "torchrun");
  EXPECT_EQ(env.rank, 3);
  EXPECT_EQ(env.world_size, 8);
  EXPECT_EQ(env.local_rank, 1);
  EXPECT_EQ(env.master_addr, "node7");
  EXPECT_EQ(env.master_port, 29400);
  EXPECT_TRUE(env.agent_store);
  EXPECT_EQ(env.store_prefix, "/worker/attempt_2");
}

TEST(LaunchEnv, SrunStep) {
  const LaunchEnv env = read({{"SLURM_PROCID", "5"},
                              {"SLURM_STEP_NUM_TASKS", "8"},
                              {"SLURM_NTASKS", "8"},
                              {"SLURM_LOCALID", "1"},
                              {"SLURM_JOB_NODELIST", "gpu[07-09,12]"},
                              {"SLURM_JOB_ID", "123456"}});
  EXPECT_EQ(env.launcher, "slurm");
  EXPECT_EQ(env.rank, 5);
  EXPECT_EQ(env.world_size, 8);
  EXPECT_EQ(env.local_rank, 1);
  EXPECT_EQ(env.master_addr, "gpu07");
  EXPECT_EQ(env.master_port, 20000 + 123456 % 20000);
  EXPECT_FALSE(env.agent_store);
}

TEST(LaunchEnv, TheBatchScriptItselfIsOneProcess) {
  // sbatch sets SLURM_NTASKS and SLURM_PROCID=0 for the script; only srun steps have peers.
  const LaunchEnv env = read({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_JOB_NODELIST", "n1"}});
  EXPECT_EQ(env.world_size, 1);
  EXPECT_EQ(env.launcher, "none");
}

TEST(LaunchEnv, MasterVariablesOverrideSlurmDefaults) {
  const LaunchEnv env = read({{"SLURM_PROCID", "0"},
                              {"SLURM_STEP_NUM_TASKS", "2"},
                              {"SLURM_JOB_NODELIST", "a[1-2]"},
                              {"MASTER_ADDR", "10.0.0.5"},
                              {"MASTER_PORT", "1234"}});
  EXPECT_EQ(env.master_addr, "10.0.0.5");
  EXPECT_EQ(env.master_port, 1234);
}

TEST(LaunchEnv, FirstSlurmHost) {
  EXPECT_EQ(first_slurm_host("node1"), "node1");
  EXPECT_EQ(first_slurm_host("node1,node2"), "node1");
  EXPECT_EQ(first_slurm_host("gpu[07-09,12],cpu1"), "gpu07");
  EXPECT_EQ(first_slurm_host("rack[3,5]-node[001-004]"), "rack3-node001");
  EXPECT_EQ(first_slurm_host("a-b[9]"), "a-b9");
  EXPECT_THROW(first_slurm_host("gpu[07-09"), Error);
  EXPECT_THROW(first_slurm_host(""), Error);
}

TEST(LaunchEnv, BadValuesNameTheVariable) {
  auto message = [](const std::map<std::string, std::string>& vars) {
    try {
      read(vars);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message({{"RANK", "2"}, {"WORLD_SIZE", "2"}}).find("RANK=\"2\""), std::string::npos);
  EXPECT_NE(message({{"RANK", "x"}, {"WORLD_SIZE", "2"}}).find("RANK=\"x\""), std::string::npos);
  EXPECT_NE(message({{"RANK", "0"}, {"WORLD_SIZE", "0"}}).find("WORLD_SIZE"), std::string::npos);
  EXPECT_NE(message({{"RANK", "0"}}).find("RANK and WORLD_SIZE"), std::string::npos);
  EXPECT_NE(message({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}}).find("MASTER_PORT"),
            std::string::npos);
}

// Which GPU a process trains on: GPU N of "cuda:N" in one process (nothing else sets it, and a
// run that left it to GPU 0 would put its context on someone else's GPU), the local rank's GPU
// under a launcher, the CPU as configured.
TEST(LaunchEnv, RankDeviceKeepsTheConfiguredGpuInOneProcessAndTakesTheLocalRanksOtherwise) {
  const LaunchEnv one = read({});
  EXPECT_EQ(rank_device(c10::Device(c10::kCUDA, 3), one), c10::Device(c10::kCUDA, 3));
  EXPECT_EQ(rank_device(c10::Device(c10::kCPU), one), c10::Device(c10::kCPU));
  const LaunchEnv ranks = read({{"RANK", "5"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}});
  ASSERT_TRUE(ranks.distributed());
  EXPECT_EQ(rank_device(c10::Device(c10::kCUDA, 0), ranks), c10::Device(c10::kCUDA, 1));
  EXPECT_EQ(rank_device(c10::Device(c10::kCPU), ranks), c10::Device(c10::kCPU));
}

}  // namespace
}  // namespace gpt2ft
