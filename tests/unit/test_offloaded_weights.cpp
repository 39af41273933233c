// Block streaming (dist/offloaded_weights.h) against resident weights: bit-identical output,
// input gradient and LoRA gradients, forward and backward, with and without checkpointing, for
// several prefetch depths, partial offload, and fp8 stored blocks streamed under the fp8 layer.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "core/error.h"
#include "dist/fp8_weights.h"
#include "dist/offloaded_weights.h"
#include "support/provider_check.h"

using namespace fluxtrain;
using namespace fluxtrain::provider_check;

namespace {

void compare_all_variants(const FluxConfig& cfg, BlockWeights& want_w, BlockWeights& got_w, at::ScalarType dt) {
  for (int variant = 0; variant < 3; ++variant) {
    const bool ckpt = variant == 1, repeat = variant == 2;
    SCOPED_TRACE(std::string(ckpt ? "checkpointing" : "no checkpointing") + (repeat ? ", repeated forward" : ""));
    Result want = run(cfg, want_w, ckpt, 200 + variant, dt);
    Result got = run(cfg, got_w, ckpt, 200 + variant, dt, repeat);
    expect_identical(got, want);
  }
}

}  // namespace

TEST(OffloadedWeights, SpreadAndBudget) {
  EXPECT_EQ(dist::spread_streamed_blocks(5, 0), std::vector<bool>({false, false, false, false, false}));
  EXPECT_EQ(dist::spread_streamed_blocks(4, 2), std::vector<bool>({false, true, false, true}));
  EXPECT_EQ(dist::spread_streamed_blocks(5, 5), std::vector<bool>(5, true));
  EXPECT_EQ(dist::spread_streamed_blocks(3, 9), std::vector<bool>(3, true));
  for (int n = 1; n < 60; n += 7)
    for (int c = 0; c <= n; ++c) {
      const auto s = dist::spread_streamed_blocks(n, c);
      EXPECT_EQ(std::count(s.begin(), s.end(), true), c) << n << " " << c;
    }
  // Blocks of 10 bytes: with 2 ring slots, c streamed blocks need (n - c) * 10 + 20 bytes.
  const std::vector<int64_t> b(6, 10);
  EXPECT_EQ(dist::blocks_to_swap_for_budget(b, 60, 2), 0);
  EXPECT_EQ(dist::blocks_to_swap_for_budget(b, 59, 2), 3);  // 3 resident + 2 slots = 50
  EXPECT_EQ(dist::blocks_to_swap_for_budget(b, 20, 2), 6);
  EXPECT_EQ(dist::blocks_to_swap_for_budget(b, 19, 2), -1);
}

TEST(OffloadedWeights, StreamedMatchesResidentBitwise) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights resident(init_random_weights(cfg, 21, at::kDouble), cfg.depth, cfg.depth_single);
  const int n = static_cast<int>(cfg.num_blocks());
  for (int prefetch : {0, 1, 2}) {
    SCOPED_TRACE("prefetch " + std::to_string(prefetch));
    dist::OffloadOptions o;
    o.prefetch = prefetch;
    dist::OffloadedBlockWeights off(resident.globals(), n, [&](int i) { return resident.blocks()[i]; }, o);
    EXPECT_TRUE(off.transient());
    compare_all_variants(cfg, resident, off, at::kDouble);
    EXPECT_EQ(off.stats().wasted_prefetches, 0);
    EXPECT_GT(off.stats().prefetch_hits, 0);
    // At most one copy per block per pass: 3 runs of forward + backward, one with a second
    // forward; the turn-around reuses what is still in the ring.
    EXPECT_LE(off.stats().copies, 7 * n);
    EXPECT_EQ(off.stats().slot_bytes % (prefetch + 1), 0);
  }
}

TEST(OffloadedWeights, PartialOffloadMatchesResidentBitwise) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights resident(init_random_weights(cfg, 22, at::kDouble), cfg.depth, cfg.depth_single);
  const int n = static_cast<int>(cfg.num_blocks());
  dist::OffloadOptions o;
  o.prefetch = 1;
  o.streamed = dist::spread_streamed_blocks(n, 3);
  dist::OffloadedBlockWeights off(resident.globals(), n, [&](int i) { return resident.blocks()[i]; }, o);
  EXPECT_EQ(off.stats().streamed_blocks, 3);
  EXPECT_GT(off.stats().resident_block_bytes, 0);
  compare_all_variants(cfg, resident, off, at::kDouble);
  EXPECT_EQ(off.stats().wasted_prefetches, 0);
  // Resident blocks hand out the same tensors as the resident provider's values, never copied.
  EXPECT_TRUE(at::equal(off.acquire(0).at("img_attn.qkv.weight"), resident.acquire(0).at("img_attn.qkv.weight")));
  off.release(0);
}

TEST(OffloadedWeights, Fp8StreamedUnderFp8LayerMatchesResidentDequantisedBitwise) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 23, at::kFloat), cfg.depth, cfg.depth_single);
  const int n = static_cast<int>(cfg.num_blocks());
  std::vector<TensorMap> stored;
  TensorMap dequantised_full;
  for (const auto& [k, v] : original.globals()) dequantised_full.emplace(k, v.to(at::kDouble));
  for (int i = 0; i < n; ++i) {
    stored.push_back(dist::quantise_block_fp8(original.blocks()[i], {}, at::kDouble));
    for (const auto& [k, v] : dist::dequantise_block_fp8(stored.back(), at::kDouble))
      dequantised_full.emplace(block_prefix(i, cfg.depth) + k, v);
  }
  ResidentBlockWeights reference(dequantised_full, cfg.depth, cfg.depth_single);
  TensorMap globals;
  for (const auto& [k, v] : original.globals()) globals.emplace(k, v.to(at::kDouble));
  dist::OffloadOptions o;
  o.prefetch = 2;
  auto off = std::make_unique<dist::OffloadedBlockWeights>(globals, n, [&](int i) { return stored[i]; }, o);
  dist::OffloadedBlockWeights* inner = off.get();
  dist::Fp8BlockWeights fp8(std::move(off), at::kDouble, at::kCPU);
  compare_all_variants(cfg, reference, fp8, at::kDouble);
  // fp8 codes cross the link, not the dequantised weights.
  EXPECT_LT(inner->stats().host_bytes, dist::tensor_map_bytes(dequantised_full));
  EXPECT_EQ(inner->stats().wasted_prefetches, 0);
}

TEST(OffloadedWeights, MisuseIsAnInternalError) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights resident(init_random_weights(cfg, 24, at::kFloat), cfg.depth, cfg.depth_single);
  dist::OffloadOptions o;
  o.prefetch = 0;  // one slot
  dist::OffloadedBlockWeights off(resident.globals(), static_cast<int>(cfg.num_blocks()),
                                  [&](int i) { return resident.blocks()[i]; }, o);
  off.acquire(1);
  EXPECT_THROW(off.acquire(1), Error);
  EXPECT_THROW(off.acquire(2), Error);  // the only slot is held
  off.release(1);
  EXPECT_THROW(off.release(1), Error);
  EXPECT_THROW(off.acquire(99), Error);
}
