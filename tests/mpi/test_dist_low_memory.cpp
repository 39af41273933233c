// Low-memory stacks under MPI sharding: fp8 blocks sharded over the ranks, gathered in fp8 and
// dequantised by the fp8 layer, give bit-identical output and gradients to one process holding
// the dequantised weights (each rank runs its own inputs). Streaming under sharding (each rank
// keeps its shard of a streamed block in host memory and copies it in before the gather) gives
// bit-identical outputs and gradients to the sharded provider keeping every shard resident, in
// the compute dtype and in fp8.
#include "core/error.h"
#include "dist/fp8_weights.h"
#include "dist/low_memory_weights.h"
#include "dist/sharded_weights.h"
#include "support/provider_check.h"
#include "tests/mpi/dist_test_util.h"

namespace fluxtrain::dist::testing {
namespace {

using namespace fluxtrain::provider_check;

TEST(DistLowMemory, Fp8ShardedMatchesResidentDequantisedBitwise) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 41, at::kFloat), cfg.depth, cfg.depth_single);
  const int n = static_cast<int>(cfg.num_blocks());
  TensorMap deq;
  for (const auto& [k, v] : original.globals()) deq.emplace(k, v.to(at::kDouble));
  for (int i = 0; i < n; ++i)
    for (const auto& [k, v] : dequantise_block_fp8(quantise_block_fp8(original.blocks()[i], {}, at::kDouble), at::kDouble))
      deq.emplace(block_prefix(i, cfg.depth) + k, v);
  ResidentBlockWeights reference(deq, cfg.depth, cfg.depth_single);

  WeightsSource src;
  src.globals = original.globals();
  src.num_blocks = n;
  src.load_block = [&](int i) { return original.blocks()[i]; };
  LowMemoryOptions o;
  o.base_precision = "fp8";
  auto w = compose_low_memory_weights(src, o, at::kCPU, at::kDouble, &comm());
  auto* fp8 = dynamic_cast<Fp8BlockWeights*>(w.get());
  ASSERT_NE(fp8, nullptr);
  auto* sharded = dynamic_cast<ShardedBlockWeights*>(&fp8->inner());
  ASSERT_NE(sharded, nullptr);
  for (int variant = 0; variant < 3; ++variant) {
    const bool ckpt = variant == 1, repeat = variant == 2;
    SCOPED_TRACE(std::string(ckpt ? "checkpointing" : "no checkpointing") + (repeat ? ", repeated forward" : ""));
    Result want = run(cfg, reference, ckpt, 500 + comm().rank(), at::kDouble);
    Result got = run(cfg, *w, ckpt, 500 + comm().rank(), at::kDouble, repeat);
    expect_identical(got, want);
  }
  // Each rank keeps about 1/N of the fp8 blocks.
  EXPECT_LT(sharded->stats().shard_bytes, sharded->stats().full_block_bytes / comm().size() + 3 * n * 4096 + 1);
}

WeightsSource source_of(ResidentBlockWeights& w) {
  WeightsSource src;
  src.globals = w.globals();
  src.num_blocks = w.num_blocks();
  src.load_block = [&w](int i) { return w.blocks()[i]; };
  src.block_shapes = [&w](int i) {  // so that every plan counts bytes
    BlockShapes sh;
    for (const auto& [k, v] : w.blocks()[i]) sh.emplace_back(k, v.sizes().vec());
    return sh;
  };
  return src;
}

ShardedBlockWeights* sharded_of(BlockWeights& w) {
  BlockWeights* inner = &w;
  if (auto* f = dynamic_cast<Fp8BlockWeights*>(inner)) inner = &f->inner();
  return dynamic_cast<ShardedBlockWeights*>(inner);
}

// Sharded + streamed against sharded + resident, both composed from the options: the same
// shards, only where they live between steps differs.
void expect_streaming_identical(const std::string& precision) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 43, at::kFloat), cfg.depth, cfg.depth_single);
  const int n = static_cast<int>(cfg.num_blocks());
  const WeightsSource src = source_of(original);
  LowMemoryOptions o;
  o.base_precision = precision;
  auto resident = compose_low_memory_weights(src, o, at::kCPU, at::kDouble, &comm());
  ASSERT_NE(sharded_of(*resident), nullptr);
  EXPECT_EQ(sharded_of(*resident)->stats().streamed_blocks, 0);
  for (int swap : {2, -1}) {
    SCOPED_TRACE("--blocks_to_swap " + std::to_string(swap));
    o.blocks_to_swap = swap;
    LowMemoryPlan plan;
    auto streamed = compose_low_memory_weights(src, o, at::kCPU, at::kDouble, &comm(), 0, &plan);
    ShardedBlockWeights* sw = sharded_of(*streamed);
    ASSERT_NE(sw, nullptr);
    const ShardedWeightsStats& st = sw->stats();
    EXPECT_EQ(plan.streamed_blocks, swap < 0 ? n : swap);
    EXPECT_EQ(plan.shard_ranks, comm().size());
    EXPECT_EQ(st.streamed_blocks, plan.streamed_blocks);
    // The streamed shards left the device: what stays there is the rest plus two stream buffers.
    const ShardedWeightsStats& rs = sharded_of(*resident)->stats();
    EXPECT_EQ(st.shard_bytes + st.host_shard_bytes, rs.shard_bytes);
    EXPECT_GT(st.host_shard_bytes, 0);
    EXPECT_GT(st.stream_buffer_bytes, 0);
    if (swap < 0) EXPECT_EQ(st.shard_bytes, 0);
    for (int variant = 0; variant < 3; ++variant) {
      const bool ckpt = variant == 1, repeat = variant == 2;
      SCOPED_TRACE(std::string(ckpt ? "checkpointing" : "no checkpointing") + (repeat ? ", repeated forward" : ""));
      const int64_t copies = st.shard_copies;
      Result want = run(cfg, *resident, ckpt, 700 + comm().rank(), at::kDouble, repeat);
      Result got = run(cfg, *streamed, ckpt, 700 + comm().rank(), at::kDouble, repeat);
      expect_identical(got, want);
      // Every streamed block was gathered, so its shard came from host memory at least once.
      EXPECT_GE(st.shard_copies - copies, plan.streamed_blocks);
    }
    EXPECT_EQ(st.shard_bytes_copied > 0, true);
  }
}

TEST(DistLowMemory, ShardedStreamingMatchesShardedResidentBitwise) { expect_streaming_identical("bf16"); }

TEST(DistLowMemory, Fp8ShardedStreamingMatchesFp8ShardedResidentBitwise) { expect_streaming_identical("fp8"); }

// On the GPU with NCCL (skipped without): the shard copies run on a side stream and the gathers
// are issued from it; forwards (the prefetch overlapping compute, then a second pass finding
// blocks in other slots) equal the sharded-resident provider's bit for bit.
TEST(DistLowMemory, ShardedStreamingOnCudaMatchesShardedResident) {
  Communicator* nc = nccl_comm();
  if (!nc) GTEST_SKIP() << "no NCCL in this build or no GPU on some rank";
  const at::Device dev = nccl_device();
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 45, at::kFloat), cfg.depth, cfg.depth_single);
  for (const char* precision : {"bf16", "fp8"}) {
    SCOPED_TRACE(precision);
    LowMemoryOptions o;
    o.base_precision = precision;
    auto resident = compose_low_memory_weights(source_of(original), o, dev, at::kFloat, nc);
    o.blocks_to_swap = -1;
    auto streamed = compose_low_memory_weights(source_of(original), o, dev, at::kFloat, nc);
    ASSERT_EQ(sharded_of(*streamed)->stats().streamed_blocks, static_cast<int>(cfg.num_blocks()));
    at::NoGradGuard ng;
    for (int pass = 0; pass < 2; ++pass) {
      const FluxInputs in = make_inputs(cfg, 800 + pass, at::kFloat);
      const at::Tensor want = flux_forward(cfg, *resident, nullptr, in);
      const at::Tensor got = flux_forward(cfg, *streamed, nullptr, in);
      EXPECT_TRUE(bits_equal(got.cpu(), want.cpu())) << "pass " << pass;
    }
    EXPECT_GE(sharded_of(*streamed)->stats().shard_copies, 2 * cfg.num_blocks());
  }
}

// --max_gpu_memory under sharding: a budget just under the sharded-resident weights streams
// blocks, the provider holds about what the plan says, and the results stay bit-identical.
TEST(DistLowMemory, ShardedBudgetStreamsTheFewestBlocksThatFit) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 46, at::kFloat), cfg.depth, cfg.depth_single);
  const int n = static_cast<int>(cfg.num_blocks());
  const WeightsSource src = source_of(original);
  LowMemoryOptions o;
  LowMemoryPlan all_resident;
  auto resident = compose_low_memory_weights(src, o, at::kCPU, at::kDouble, &comm(), 0, &all_resident);
  EXPECT_EQ(all_resident.streamed_blocks, 0);
  EXPECT_EQ(all_resident.shard_ranks, comm().size());
  o.max_gpu_memory = std::to_string(all_resident.device_weight_bytes - 1);
  LowMemoryPlan plan;
  auto streamed = compose_low_memory_weights(src, o, at::kCPU, at::kDouble, &comm(), 0, &plan);
  // Streaming costs two whole-block buffers and saves 1/N per block: on many ranks only most or
  // all blocks streamed fit under the sharded-resident bytes. The fewest that fit are chosen.
  EXPECT_GT(plan.streamed_blocks, 0);
  EXPECT_LE(plan.streamed_blocks, n);
  EXPECT_LE(plan.device_weight_bytes, o.max_gpu_memory_bytes());
  if (plan.streamed_blocks > 1) {
    LowMemoryOptions fewer;
    fewer.blocks_to_swap = plan.streamed_blocks - 1;
    EXPECT_GT(plan_low_memory_weights(src, fewer, at::kDouble, 0, comm().size()).device_weight_bytes,
              o.max_gpu_memory_bytes());
  }
  const ShardedWeightsStats& st = sharded_of(*streamed)->stats();
  EXPECT_EQ(st.streamed_blocks, plan.streamed_blocks);
  // What the provider holds, up to the padding of each part to the mapping granularity.
  const int64_t padding = 4 * (n + 4) * comm().size() * st.granularity;
  EXPECT_LE(st.resident_bytes(), plan.device_weight_bytes + padding);
  EXPECT_GE(st.resident_bytes() + padding, plan.device_weight_bytes);
  EXPECT_LE(st.host_shard_bytes, plan.host_weight_bytes + padding);
  expect_identical(run(cfg, *streamed, false, 900 + comm().rank(), at::kDouble),
                   run(cfg, *resident, false, 900 + comm().rank(), at::kDouble));
}

TEST(DistLowMemory, ShardedStreamingRefusesAnotherPrefetch) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 44, at::kFloat), cfg.depth, cfg.depth_single);
  LowMemoryOptions o;
  o.blocks_to_swap = 2;
  o.offload_prefetch = 2;
  try {
    compose_low_memory_weights(source_of(original), o, at::kCPU, at::kDouble, &comm());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--offload_prefetch 2 with --shard_weights"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace fluxtrain::dist::testing
