// The ranks of a data-parallel run and the collectives between them, on c10d process groups:
//
//   data group     NCCL for CUDA tensors (or Gloo on the CPU): gradients, the initial
//                  broadcast, ZeRO-1's weights. On CUDA these never block the host.
//   control group  Gloo over TCP on the CPU: small host-side agreements (out-of-memory,
//                  stop requests, found_inf, the logged losses), RNG states and barriers.
//
// Both rendezvous through one c10d TCPStore at MASTER_ADDR:MASTER_PORT (rank 0 serves it,
// unless torchrun's agent already does). With world size 1 there are no process groups and
// every collective returns at once, so single-process training pays nothing.
//
// A collective that fails or times out (a peer died, hung or never started) throws Error
// naming the operation, this rank and what to check; it never hangs past the timeout. On NCCL
// that takes two rules, since a NCCL wait only makes a stream wait and a hung NCCL collective
// is seen by NCCL's watchdog alone (which ends the process with SIGABRT):
//   1. The host reads a GPU value only after a control-group step that every rank reached
//      after issuing its data-group collectives (reduce_device_scalars), so the value never
//      waits on a collective that a dead or hung peer did not issue.
//   2. The data group's timeout is longer than the control group's (data_group_timeout), so
//      the control group reports a hung peer first and every rank exits with its message.
#pragma once

#include <c10/core/Device.h>
#include <torch/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpt2ft/distributed/launch_env.h"

namespace gpt2ft {

// A launched asynchronous collective.
class PendingCollective {
 public:
  struct Impl;
  PendingCollective();
  explicit PendingCollective(std::shared_ptr<Impl> impl);
  // Waits for it (on CUDA: makes the current stream wait; the host does not block).
  void wait();

 private:
  std::shared_ptr<Impl> impl_;
};

// The data group's timeout for a control-group timeout: NCCL counts from when a collective is
// issued, which can be a whole backward before the control group's agreement starts.
std::chrono::milliseconds data_group_timeout(const std::string& backend, std::chrono::milliseconds control);

enum class HostReduce { sum, max };

class Communicator {
 public:
  // backend: "auto" (NCCL for CUDA devices, Gloo on the CPU) | "nccl" | "gloo".
  // groups_for_one_rank: create the process groups even for world size 1 (tests).
  Communicator(const LaunchEnv& env, c10::Device device, const std::string& backend, double timeout_s,
               bool groups_for_one_rank = false);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return env_.rank; }
  int world_size() const { return env_.world_size; }
  bool is_main() const { return env_.rank == 0; }
  bool distributed() const { return env_.world_size > 1; }
  // Process groups exist: collectives really run (world size > 1, or forced).
  bool active() const { return groups_ != nullptr; }
  const std::string& backend() const { return backend_; }
  const LaunchEnv& env() const { return env_; }

  // Data group, on the training device.
  void broadcast_(std::vector<torch::Tensor> tensors, int root, const std::string& what);
  PendingCollective all_reduce_sum_async(torch::Tensor tensor, const std::string& what);
  void all_reduce_sum_(torch::Tensor tensor, const std::string& what);
  void all_reduce_max_(torch::Tensor tensor, const std::string& what);

  // Control group, on the host: the element-wise maximum of every rank's values.
  std::vector<int64_t> agree_max(std::vector<int64_t> values, const std::string& what);
  // Every rank's copy of a 1-D uint8 CPU tensor of the same length on all ranks.
  std::vector<torch::Tensor> all_gather_bytes(const torch::Tensor& bytes, const std::string& what);
  void barrier(const std::string& what);
  // The scalars' values on the host, reduced over the ranks on the control group, after a
  // barrier (rule 1 above). Without process groups: the local values.
  std::vector<double> reduce_device_scalars(const std::vector<torch::Tensor>& scalars, HostReduce op,
                                            const std::string& what);

 private:
  struct Groups;
  LaunchEnv env_;
  c10::Device device_;
  std::string backend_ = "none";
  std::chrono::milliseconds timeout_;
  std::string where_;  // "rank r of W", for error messages
  std::unique_ptr<Groups> groups_;
};

}  // namespace gpt2ft
