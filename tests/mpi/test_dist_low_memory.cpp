// Low-memory stacks under MPI sharding: fp8 blocks sharded over the ranks, gathered in fp8 and
// dequantised by the fp8 layer, give bit-identical output and gradients to one process holding
// the dequantised weights (each rank runs its own inputs). Streaming with sharding is refused
// on every rank alike.
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

  o.blocks_to_swap = 2;
  EXPECT_THROW(compose_low_memory_weights(src, o, at::kCPU, at::kDouble, &comm()), Error);
}

}  // namespace
}  // namespace fluxtrain::dist::testing
