// c10d plumbing inside one process: a process group of one rank (TCPStore + Gloo on the CPU,
// NCCL on a GPU) runs every collective the trainer uses, the bucketed reducer returns the
// gradients autograd computed, and its buckets are the bytes the memory planner predicts.
// Several ranks are tested end to end by tests/python/test_distributed.py.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <torch/cuda.h>
#include <torch/torch.h>
#include <unistd.h>

#include "gpt2ft/distributed/communicator.h"
#include "gpt2ft/distributed/grad_reducer.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/memory/planner.h"
#include "gpt2ft/model/finetune.h"
#include "gpt2ft/model/init.h"
#include "gpt2ft/train/trainer.h"
#include "test_support.h"

namespace gpt2ft {
namespace {

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

LaunchEnv one_rank() {
  LaunchEnv env;
  env.master_port = free_port();
  return env;
}

GPT2Config small_config() {
  GPT2Config c;
  c.n_layer = 2, c.n_head = 2, c.n_embd = 32, c.vocab_size = 97, c.n_positions = 16;
  c.resid_pdrop = c.embd_pdrop = c.attn_pdrop = 0;  // the same gradients on every backward
  return c;
}

// Gradients of one backward, with the reducer armed, equal those without it (mean over one rank).
void check_reducer_returns_autograd_gradients(c10::Device device, const std::string& backend) {
  Communicator comm(one_rank(), device, backend, 60, /*groups_for_one_rank=*/true);
  ASSERT_TRUE(comm.active());
  GPT2 model(small_config());
  init_gpt2_weights(model, 3);
  model->to(device);
  const torch::Tensor idx = torch::randint(0, 97, {3, 17}, torch::TensorOptions().dtype(torch::kLong).device(device));
  auto backward = [&] {
    for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();
    next_token_loss(model->forward(idx.narrow(1, 0, 16)), idx.narrow(1, 1, 16)).backward();
  };
  backward();
  std::vector<torch::Tensor> expected;
  for (const auto& p : model->parameters()) expected.push_back(p.grad().clone());

  // 1 KiB buckets: several, so that launch order across buckets is exercised.
  GradReducer reducer(comm, model->parameters(), 1024);
  EXPECT_GT(reducer.num_buckets(), 3);
  reducer.arm();
  backward();
  reducer.finish();
  const auto params = model->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::equal(params[i].grad(), expected[i])) << "parameter " << i;
  }
  // Not armed: backward leaves gradients alone, finish() still reduces them.
  backward();
  reducer.finish();
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(torch::equal(params[i].grad(), expected[i]));
  // A parameter no rank has a gradient for keeps none (AdamW then leaves it alone), instead of
  // getting a zero gradient from the reduction.
  backward();
  params[1].mutable_grad().reset();
  reducer.finish();
  EXPECT_FALSE(params[1].grad().defined());
  for (size_t i = 0; i < params.size(); ++i) {
    if (i == 1) continue;
    EXPECT_TRUE(torch::equal(params[i].grad(), expected[i])) << "parameter " << i;
  }
}

void check_collectives(c10::Device device, const std::string& backend) {
  Communicator comm(one_rank(), device, backend, 60, /*groups_for_one_rank=*/true);
  const auto opts = torch::TensorOptions().device(device);
  torch::Tensor t = torch::arange(5, opts.dtype(torch::kFloat));
  comm.broadcast_({t}, 0, "test tensor");
  comm.all_reduce_sum_(t, "test tensor");
  EXPECT_TRUE(torch::equal(t.cpu(), torch::arange(5, torch::kFloat)));
  torch::Tensor flag = torch::ones({}, opts.dtype(torch::kFloat));
  comm.all_reduce_max_(flag, "flag");
  EXPECT_EQ(flag.item<float>(), 1.0f);
  EXPECT_EQ(comm.agree_max({0, 7, 1}, "test values"), (std::vector<int64_t>{0, 7, 1}));
  const torch::Tensor bytes = torch::arange(16, torch::kUInt8);
  const auto gathered = comm.all_gather_bytes(bytes, "test bytes");
  ASSERT_EQ(gathered.size(), 1u);
  EXPECT_TRUE(torch::equal(gathered[0], bytes));
  comm.barrier("test");
  const torch::Tensor loss = torch::full({}, 2.5, opts.dtype(torch::kFloat));
  const torch::Tensor inf = torch::ones({}, opts.dtype(torch::kFloat));
  EXPECT_EQ(comm.reduce_device_scalars({loss, inf}, HostReduce::sum, "test scalars"), (std::vector<double>{2.5, 1.0}));
  EXPECT_EQ(comm.reduce_device_scalars({inf}, HostReduce::max, "test flag"), (std::vector<double>{1.0}));
}

TEST(Distributed, GlooCollectivesOnOneRank) { check_collectives(c10::kCPU, "gloo"); }

// NCCL counts its timeout from when a collective is issued (during backward for gradient
// buckets), the control group from when its agreement starts: NCCL's must be longer, or its
// watchdog ends a rank with SIGABRT before the control group can report a hung peer.
TEST(Distributed, NcclTimesOutAfterTheControlGroup) {
  using std::chrono::milliseconds;
  for (const int64_t control_ms : {1'000, 60'000, 600'000, 7'200'000}) {
    const milliseconds control(control_ms);
    EXPECT_GE(data_group_timeout("nccl", control), 2 * control + milliseconds(60'000)) << control_ms;
    EXPECT_EQ(data_group_timeout("gloo", control), control) << "Gloo reports in the waiting thread";
  }
}

TEST(Distributed, ScalarsWithoutProcessGroupsAreTheLocalValues) {
  Communicator comm(LaunchEnv{}, c10::kCPU, "auto", 60);
  EXPECT_EQ(comm.reduce_device_scalars({torch::full({}, 3.0)}, HostReduce::sum, "x"), (std::vector<double>{3.0}));
}

TEST(Distributed, ReducerReturnsAutogradGradientsOnGloo) {
  check_reducer_returns_autograd_gradients(c10::kCPU, "gloo");
}

TEST(Distributed, NoProcessGroupsNoBuckets) {
  Communicator comm(LaunchEnv{}, c10::kCPU, "auto", 60);
  EXPECT_FALSE(comm.active());
  GPT2 model(small_config());
  GradReducer reducer(comm, model->parameters(), 1024);
  EXPECT_EQ(reducer.bucket_bytes_total(), 0);  // single process: no memory spent
}

TEST(Distributed, GradientBucketsAreThePlannersBytes) {
  for (const int64_t frozen_blocks : {0, 1}) {
    test::TempDir tmp;
    GPT2Config c = small_config();
    c.tie_word_embeddings = frozen_blocks == 0;
    GPT2 model(c);
    init_gpt2_weights(model, 1);
    save_model_folder(model, tmp.path() / "m");
    const TrainConfig cfg =
        TrainConfig::parse({{"model", {{"init_from", (tmp.path() / "m").string()}, {"freeze_blocks", frozen_blocks}}},
                            {"data", {{"train", "x"}, {"seq_len", 16}}},
                            {"train", {{"max_steps", 1}}}});
    MemoryPlanInput input = memory_plan_input(cfg);
    input.world_size = 4;
    const MemoryPlan plan = plan_memory(input);
    freeze(model, false, frozen_blocks);
    Communicator comm(one_rank(), c10::kCPU, "gloo", 60, true);
    GradReducer reducer(comm, model->parameters(), 25 << 20);
    EXPECT_EQ(plan.gradient_buckets, reducer.bucket_bytes_total()) << "frozen blocks " << frozen_blocks;
    input.world_size = 1;
    EXPECT_EQ(plan_memory(input).gradient_buckets, 0);
  }
}

class DistributedCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  }
};

TEST_F(DistributedCuda, NcclCollectivesOnOneRank) { check_collectives(c10::Device(c10::kCUDA, 0), "nccl"); }

TEST_F(DistributedCuda, ReducerReturnsAutogradGradientsOnNccl) {
  check_reducer_returns_autograd_gradients(c10::Device(c10::kCUDA, 0), "nccl");
}

}  // namespace
}  // namespace gpt2ft
