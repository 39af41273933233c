// Low-memory options (dist/low_memory_options.h) and the provider stack they compose
// (dist/low_memory_weights.h): every combination against the resident provider holding the
// same (dequantised) weights, bitwise; budgets; one clear error per bad flag.
#include <gtest/gtest.h>

#include <boost/program_options.hpp>

#include <ATen/ATen.h>

#include "core/error.h"
#include "dist/fp8_weights.h"
#include "dist/low_memory_weights.h"
#include "dist/offloaded_weights.h"
#include "support/provider_check.h"

using namespace fluxtrain;
using namespace fluxtrain::provider_check;
using dist::LowMemoryOptions;

namespace {

std::string error_of(const LowMemoryOptions& o) {
  try {
    o.validate();
  } catch (const Error& e) {
    EXPECT_EQ(e.exit_code(), 2);
    return e.what();
  }
  return "";
}

}  // namespace

TEST(LowMemoryOptions, ValidateNamesTheFlag) {
  LowMemoryOptions o;
  EXPECT_EQ(error_of(o), "");
  o.base_precision = "int4";
  EXPECT_NE(error_of(o).find("--base_precision"), std::string::npos);
  o = {};
  o.fp8_scaling = "block";
  EXPECT_NE(error_of(o).find("--fp8_scaling"), std::string::npos);
  o = {};
  o.offload_prefetch = -1;
  EXPECT_NE(error_of(o).find("--offload_prefetch"), std::string::npos);
  o = {};
  o.blocks_to_swap = -2;
  EXPECT_NE(error_of(o).find("--blocks_to_swap"), std::string::npos);
  o = {};
  o.max_gpu_memory = "lots";
  EXPECT_NE(error_of(o).find("--max_gpu_memory 'lots'"), std::string::npos);
  o.max_gpu_memory = "8GiB";
  o.blocks_to_swap = 3;
  EXPECT_NE(error_of(o).find("not both"), std::string::npos);
}

TEST(LowMemoryOptions, ByteSizes) {
  EXPECT_EQ(dist::parse_byte_size("8GiB", "x"), 8ll << 30);
  EXPECT_EQ(dist::parse_byte_size("8 gib", "x"), 8ll << 30);
  EXPECT_EQ(dist::parse_byte_size("7.5GB", "x"), 7500000000ll);
  EXPECT_EQ(dist::parse_byte_size("6000MiB", "x"), 6000ll << 20);
  EXPECT_EQ(dist::parse_byte_size("4096", "x"), 4096);
  for (const char* bad : {"", "GiB", "-1GiB", "8TiB", "1.2.3GB", "0"}) EXPECT_THROW(dist::parse_byte_size(bad, "x"), Error) << bad;
}

TEST(LowMemoryOptions, ProgramOptionsDeclarations) {
  namespace po = boost::program_options;
  LowMemoryOptions o;
  po::options_description desc;
  dist::add_low_memory_options(desc, o);
  const char* argv[] = {"x", "--base_precision", "fp8", "--blocks_to_swap", "-1", "--offload_prefetch", "2",
                        "--fp8_scaling", "tensor", "--fp8_modulation"};
  po::variables_map vm;
  po::store(po::parse_command_line(10, argv, desc), vm);
  po::notify(vm);
  EXPECT_TRUE(o.fp8());
  EXPECT_EQ(o.blocks_to_swap, -1);
  EXPECT_EQ(o.offload_prefetch, 2);
  EXPECT_EQ(o.fp8_scaling, "tensor");
  EXPECT_TRUE(o.fp8_modulation);
  EXPECT_TRUE(o.streams());
  EXPECT_NO_THROW(o.validate());
}

TEST(LowMemoryWeights, EveryStackMatchesResidentBitwise) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 31, at::kFloat), cfg.depth, cfg.depth_single);
  const int n = static_cast<int>(cfg.num_blocks());
  // References: the weights in float64, and their fp8 round trip.
  ResidentBlockWeights plain(original.full(), cfg.depth, cfg.depth_single);
  plain.to(at::TensorOptions().dtype(at::kDouble));
  TensorMap deq;
  for (const auto& [k, v] : original.globals()) deq.emplace(k, v.to(at::kDouble));
  for (int i = 0; i < n; ++i)
    for (const auto& [k, v] :
         dist::dequantise_block_fp8(dist::quantise_block_fp8(original.blocks()[i], {}, at::kDouble), at::kDouble))
      deq.emplace(block_prefix(i, cfg.depth) + k, v);
  ResidentBlockWeights dequantised(deq, cfg.depth, cfg.depth_single);

  const dist::WeightsSource src = source_of(original);
  for (const char* precision : {"bf16", "fp8"})
    for (int64_t swap : {0ll, 3ll, -1ll}) {
      SCOPED_TRACE(std::string(precision) + " blocks_to_swap " + std::to_string(swap));
      LowMemoryOptions o;
      o.base_precision = precision;
      o.blocks_to_swap = swap;
      dist::LowMemoryPlan plan;
      auto w = dist::compose_low_memory_weights(src, o, at::kCPU, at::kDouble, nullptr, 0, &plan);
      EXPECT_EQ(plan.streamed_blocks, swap < 0 ? n : swap);
      EXPECT_EQ(w->transient(), o.fp8() || swap != 0);
      const dist::OffloadStats* st = dist::find_offload_stats(*w);
      EXPECT_EQ(st != nullptr, swap != 0);
      BlockWeights& want = o.fp8() ? static_cast<BlockWeights&>(dequantised) : plain;
      for (bool ckpt : {false, true}) expect_identical(run(cfg, *w, ckpt, 300, at::kDouble), run(cfg, want, ckpt, 300, at::kDouble));
    }
}

TEST(LowMemoryWeights, BudgetChoosesBlocksToSwap) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 32, at::kFloat), cfg.depth, cfg.depth_single);
  const dist::WeightsSource src = source_of(original);
  LowMemoryOptions o;
  o.base_precision = "fp8";
  const dist::LowMemoryPlan all_resident = dist::plan_low_memory_weights(src, o, at::kFloat);
  EXPECT_EQ(all_resident.streamed_blocks, 0);
  EXPECT_EQ(all_resident.host_weight_bytes, 0);
  const int64_t other = 1000;
  // A budget a little under the resident total streams a few blocks and fits.
  o.max_gpu_memory = std::to_string(all_resident.device_weight_bytes + other - 1);
  const dist::LowMemoryPlan some = dist::plan_low_memory_weights(src, o, at::kFloat, other);
  EXPECT_GT(some.streamed_blocks, 0);
  EXPECT_LT(some.streamed_blocks, src.num_blocks);
  EXPECT_LE(some.device_weight_bytes + other, o.max_gpu_memory_bytes());
  EXPECT_GT(some.host_weight_bytes, 0);
  // The composed provider holds what the plan says.
  dist::LowMemoryPlan built;
  auto w = dist::compose_low_memory_weights(src, o, at::kCPU, at::kFloat, nullptr, other, &built);
  EXPECT_EQ(built.streamed_blocks, some.streamed_blocks);
  auto* fp8 = dynamic_cast<dist::Fp8BlockWeights*>(w.get());
  ASSERT_NE(fp8, nullptr);
  auto* off = dynamic_cast<dist::OffloadedBlockWeights*>(&fp8->inner());
  ASSERT_NE(off, nullptr);
  EXPECT_GE(off->stats().host_bytes, some.host_weight_bytes);  // + alignment padding per tensor
  EXPECT_LE(off->stats().host_bytes, some.host_weight_bytes + 64 * 256 * some.streamed_blocks);
  EXPECT_EQ(off->stats().streamed_blocks, some.streamed_blocks);
  // Too small: one line naming the flag.
  o.max_gpu_memory = "100";
  try {
    dist::plan_low_memory_weights(src, o, at::kFloat, other);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--max_gpu_memory 100: too small"), std::string::npos) << e.what();
  }
}
