// c10d process groups: TCPStore rendezvous, a data group (NCCL or Gloo) and a Gloo control
// group. Gloo's headers come from Debian's libgloo-dev (the torch wheel omits them); the
// implementation is the one compiled into libtorch_cpu. Only out-of-line c10d entry points
// are called, so no gloo code is compiled here.
#include "gpt2ft/distributed/communicator.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <spdlog/spdlog.h>

#include <exception>

#include "gpt2ft/core/error.h"

namespace gpt2ft {

struct PendingCollective::Impl {
  c10::intrusive_ptr<c10d::Work> work;
  std::string what;
  std::string where;
};

struct Communicator::Groups {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> data;
  c10::intrusive_ptr<c10d::Backend> control;
};

namespace {

std::string failure(const std::string& what, const std::string& where, const std::string& detail) {
  return "distributed " + what + " failed on " + where + ": " + detail +
         ". Another rank probably failed, was killed or is hung (see its log); all ranks stop";
}

template <class F>
auto guarded(const std::string& what, const std::string& where, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(failure(what, where, describe_exception(e)));
  }
}

c10::intrusive_ptr<c10d::Backend> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, const LaunchEnv& env,
                                            std::chrono::milliseconds timeout) {
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  // GLOO_SOCKET_IFNAME picks the interface as in PyTorch; otherwise the host name's address
  // (the loopback one when it does not resolve).
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME")) {
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  } else {
    options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, env.rank, env.world_size, options);
}

c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, const LaunchEnv& env,
                                            std::chrono::milliseconds timeout) {
#ifdef USE_C10D_NCCL
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, env.rank, env.world_size, options);
#else
  (void)store, (void)env, (void)timeout;
  throw Error("distributed.backend \"nccl\": this build of gpt2-finetune has no NCCL support; use \"gloo\"");
#endif
}

}  // namespace

std::chrono::milliseconds data_group_timeout(const std::string& backend, std::chrono::milliseconds control) {
  if (backend != "nccl") return control;  // Gloo fails its own wait() in the calling thread
  return 2 * control + std::chrono::milliseconds(60'000);
}

PendingCollective::PendingCollective() = default;
PendingCollective::PendingCollective(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

void PendingCollective::wait() {
  if (!impl_ || !impl_->work) return;
  guarded(impl_->what, impl_->where, [&] { impl_->work->wait(); });
  impl_->work.reset();
}

Communicator::Communicator(const LaunchEnv& env, c10::Device device, const std::string& backend, double timeout_s,
                           bool groups_for_one_rank)
    : env_(env),
      device_(device),
      timeout_(static_cast<int64_t>(timeout_s * 1000)),
      where_("rank " + std::to_string(env.rank) + " of " + std::to_string(env.world_size)) {
  if (!env_.distributed() && !groups_for_one_rank) return;
  backend_ = backend == "auto" ? (device.is_cuda() ? "nccl" : "gloo") : backend;
  if (backend_ == "nccl" && !device.is_cuda()) {
    throw Error("distributed.backend \"nccl\" needs CUDA devices but device is " + device.str() +
                "; use \"gloo\" (or \"auto\") to train on the CPU");
  }
  groups_ = std::make_unique<Groups>();
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(env_.master_port);
    so.isServer = env_.rank == 0 && !env_.agent_store;
    so.numWorkers = env_.agent_store ? std::nullopt : std::optional<std::size_t>(env_.world_size);
    so.waitWorkers = !env_.agent_store;
    so.timeout = timeout_;
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(env_.master_addr, so);
    if (!env_.store_prefix.empty()) store = c10::make_intrusive<c10d::PrefixStore>(env_.store_prefix, store);
    groups_->store = store;
  } catch (const std::exception& e) {
    throw Error("rendezvous at " + env_.master_addr + ":" + std::to_string(env_.master_port) + " failed on " + where_ +
                " (launcher " + env_.launcher + ", timeout " + fmt::format("{:g}", timeout_s) +
                " s): " + describe_exception(e) +
                ". Check that every rank started, that MASTER_ADDR/MASTER_PORT reach rank 0 and the port is free, or "
                "raise distributed.timeout_s");
  }
  guarded("process group setup", where_, [&] {
    auto data_store = c10::make_intrusive<c10d::PrefixStore>("gpt2ft/data/", groups_->store);
    auto control_store = c10::make_intrusive<c10d::PrefixStore>("gpt2ft/control/", groups_->store);
    groups_->control = make_gloo(control_store, env_, timeout_);
    const auto data_timeout = data_group_timeout(backend_, timeout_);
    groups_->data = backend_ == "nccl" ? make_nccl(data_store, env_, data_timeout)
                                       : make_gloo(data_store, env_, data_timeout);
  });
  spdlog::info("distributed: rank {} of {} (local rank {}), launcher {}, backend {}, rendezvous {}:{}", env_.rank,
               env_.world_size, env_.local_rank, env_.launcher, backend_, env_.master_addr, env_.master_port);
}

Communicator::~Communicator() {
  if (!groups_) return;
  // Process groups are shut down on every exit path (torch warns, and NCCL can hang at exit,
  // otherwise): gracefully after success, aborted while an error unwinds, since a peer may be
  // gone and a graceful NCCL shutdown would wait for it.
  const bool unwinding = std::uncaught_exceptions() > 0;
  for (auto* group : {&groups_->data, &groups_->control}) {
    if (!*group) continue;
    try {
      if (unwinding) (*group)->abort();
      else (*group)->shutdown();
    } catch (const std::exception& e) {
      spdlog::warn("shutting down the {} process group on {}: {}", group == &groups_->data ? "data" : "control",
                   where_, describe_exception(e));
    }
    group->reset();
  }
}

void Communicator::broadcast_(std::vector<torch::Tensor> tensors, int root, const std::string& what) {
  if (!active()) return;
  for (auto& t : tensors) {  // one tensor per call: NCCL and Gloo take one per device
    std::vector<at::Tensor> one = {t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    guarded("broadcast of " + what, where_, [&] { groups_->data->broadcast(one, o)->wait(); });
  }
}

PendingCollective Communicator::all_reduce_sum_async(torch::Tensor tensor, const std::string& what) {
  if (!active()) return {};
  auto impl = std::make_shared<PendingCollective::Impl>();
  impl->what = "all-reduce of " + what;
  impl->where = where_;
  std::vector<at::Tensor> one = {tensor};
  impl->work = guarded(impl->what, impl->where, [&] { return groups_->data->allreduce(one); });
  return PendingCollective(std::move(impl));
}

void Communicator::all_reduce_sum_(torch::Tensor tensor, const std::string& what) {
  all_reduce_sum_async(std::move(tensor), what).wait();
}

void Communicator::all_reduce_max_(torch::Tensor tensor, const std::string& what) {
  if (!active()) return;
  std::vector<at::Tensor> one = {tensor};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::MAX;
  guarded("all-reduce of " + what, where_, [&] { groups_->data->allreduce(one, o)->wait(); });
}

std::vector<int64_t> Communicator::agree_max(std::vector<int64_t> values, const std::string& what) {
  if (!active() || values.empty()) return values;
  torch::Tensor t = torch::tensor(values, torch::kLong);
  std::vector<at::Tensor> one = {t};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::MAX;
  guarded("agreement on " + what, where_, [&] { groups_->control->allreduce(one, o)->wait(); });
  const int64_t* p = t.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + values.size());
}

std::vector<torch::Tensor> Communicator::all_gather_bytes(const torch::Tensor& bytes, const std::string& what) {
  if (!active()) return {bytes};
  std::vector<at::Tensor> input = {bytes.contiguous()};
  std::vector<std::vector<at::Tensor>> output(1);
  for (int r = 0; r < world_size(); ++r) output[0].push_back(torch::empty_like(input[0]));
  guarded("gather of " + what, where_, [&] { groups_->control->allgather(output, input)->wait(); });
  return output[0];
}

void Communicator::barrier(const std::string& what) {
  if (!active()) return;
  guarded("barrier (" + what + ")", where_, [&] { groups_->control->barrier()->wait(); });
}

std::vector<double> Communicator::reduce_device_scalars(const std::vector<torch::Tensor>& scalars, HostReduce op,
                                                        const std::string& what) {
  if (active()) barrier(what);
  std::vector<double> values;
  for (const auto& t : scalars) values.push_back(t.item<double>());
  if (!active() || values.empty()) return values;
  torch::Tensor t = torch::tensor(values, torch::kDouble);
  std::vector<at::Tensor> one = {t};
  c10d::AllreduceOptions o;
  o.reduceOp = op == HostReduce::sum ? c10d::ReduceOp::SUM : c10d::ReduceOp::MAX;
  guarded("all-reduce of " + what, where_, [&] { groups_->control->allreduce(one, o)->wait(); });
  const double* p = t.data_ptr<double>();
  return std::vector<double>(p, p + values.size());
}

}  // namespace gpt2ft
