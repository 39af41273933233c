// The memory estimator (train/memory_estimate.h) on its pieces: shapes and parameter counts
// against the real model and LoRA code, stored fp8 bytes against real quantisation, the
// checkpointing fit against the H100 measurements it was fitted to, budgets, and the
// `estimate` / `doctor` commands.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "dist/fp8_weights.h"
#include "model/block_weights.h"
#include "model/flux_weights.h"
#include "model/lora.h"
#include "support/test_util.h"
#include "train/memory_estimate.h"

using namespace fluxtrain;

namespace {

int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

}  // namespace

TEST(MemoryEstimate, BlockShapesCoverTheModel) {
  for (const char* size : {"tiny", "flux-dev"}) {
    const FluxConfig cfg = FluxConfig::preset(size);
    int64_t all = 0, globals = 0, blocks = 0;
    size_t block_keys = 0, global_keys = 0;
    for (const auto& kv : flux_weight_shapes(cfg)) {
      all += numel(kv.second);
      if (kv.first.rfind("double_blocks.", 0) != 0 && kv.first.rfind("single_blocks.", 0) != 0) {
        globals += numel(kv.second);
        ++global_keys;
      }
    }
    for (int i = 0; i < cfg.num_blocks(); ++i)
      for (const auto& kv : flux_block_shapes(cfg, i)) {
        blocks += numel(kv.second);
        ++block_keys;
      }
    EXPECT_EQ(blocks + globals, all) << size;  // the blocks and the globals partition the model
    EXPECT_EQ(block_keys + global_keys, flux_weight_shapes(cfg).size()) << size;
    // Resident bf16: every weight, 2 bytes.
    MemoryEstimateInput in;
    in.model = cfg;
    in.lora_rank = 4;
    const MemoryEstimate m = estimate_memory(in);
    EXPECT_EQ(m.weights, 2 * all) << size;
    EXPECT_EQ(m.streamed_blocks, 0);
  }
  // FLUX.1-dev: 11.9 B parameters, 23.8 GB in bf16.
  int64_t dev = 0;
  for (const auto& kv : flux_weight_shapes(FluxConfig::preset("flux-dev"))) dev += numel(kv.second);
  EXPECT_NEAR(static_cast<double>(dev) * 2 / 1e9, 23.8, 0.1);
}

TEST(MemoryEstimate, LoraStateMatchesTheLoraCode) {
  // The LoRA tensors LoraSet::create really makes, counted element by element, for both modes and
  // for standard mode's default and wide target lists (kohya-style: both streams, linear1/2).
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const std::vector<std::string> wide = {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                         "add_v_proj", "to_add_out", "proj_mlp", "proj_out"};
  for (int variant = 0; variant < 3; ++variant) {
    const bool easy = variant == 0;
    LoraConfig lc;
    lc.mode = easy ? LoraMode::EasyControl : LoraMode::Standard;
    lc.lora_num = easy ? 2 : 1;
    lc.ranks.assign(lc.lora_num, 8);
    lc.alphas.assign(lc.lora_num, 8);
    if (variant == 2) lc.targets = wide;
    const LoraSet s = LoraSet::create(cfg, lc, 1);
    int64_t params = 0;
    for (const at::Tensor& p : s.parameters()) params += p.numel();
    EXPECT_EQ(lora_parameter_count(cfg, lc), params);
    MemoryEstimateInput in;
    in.model = cfg;
    in.easycontrol = easy;
    in.num_conditions = lc.lora_num;
    in.lora_rank = 8;
    in.lora_targets = lc.targets;
    EXPECT_EQ(estimate_memory(in).lora, 16 * params) << "variant " << variant;
  }
}

TEST(MemoryEstimate, Fp8WeightsMatchRealQuantisation) {
  const FluxConfig cfg = FluxConfig::preset("tiny");
  ResidentBlockWeights w(init_random_weights(cfg, 3, at::kFloat), cfg.depth, cfg.depth_single);
  int64_t stored = 0, globals = 0, largest = 0;
  for (const TensorMap& b : w.blocks()) {
    stored += dist::tensor_map_bytes(dist::quantise_block_fp8(b, {}, at::kBFloat16));
    int64_t compute = 0;
    for (const auto& kv : b) compute += kv.second.numel() * 2;
    largest = std::max(largest, compute);
  }
  for (const auto& kv : w.globals()) globals += kv.second.numel() * 2;
  MemoryEstimateInput in;
  in.model = cfg;
  in.lora_rank = 4;
  in.low_memory.base_precision = "fp8";
  EXPECT_EQ(estimate_memory(in).weights, stored + globals + largest);  // + the one dequantisation slot
}

TEST(MemoryEstimate, ReproducesTheMeasurementsItWasFittedTo) {
  // docs/benchmarks.md, H100, resident bf16, max_memory_allocated (GiB): cond/noise/rank,
  // without and with checkpointing. The fit must stay within 2% of every point.
  struct Point {
    int64_t cond, noise, rank;
    double off, on;
  };
  for (const Point& p : {Point{192, 384, 16, 27.7, 23.1}, Point{256, 512, 32, 30.5, 23.6},
                         Point{384, 768, 64, 37.9, 24.9}, Point{512, 1024, 128, 48.8, 26.8}})
    for (bool ckpt : {false, true}) {
      MemoryEstimateInput in;
      in.cond_size = p.cond;
      in.noise_size = p.noise;
      in.lora_rank = p.rank;
      in.gradient_checkpointing = ckpt;
      const double got = static_cast<double>(estimate_memory(in).allocated()) / (1ll << 30);
      EXPECT_NEAR(got, ckpt ? p.on : p.off, 0.02 * (ckpt ? p.on : p.off)) << p.cond << "/" << p.noise << " " << ckpt;
    }
}

// --checkpoint_attention's term (one attention output and its log-sum-exp per token and block,
// from the tensors' sizes) against the checkpointed peaks measured with it on the H200 in session
// 11 (docs/benchmarks.md, `bench/gpu_step_check.sh`, max_memory_allocated GiB), within 3%.
TEST(MemoryEstimate, KeptAttentionMatchesTheH200Measurements) {
  struct Point {
    int64_t cond, noise, rank;
    double gib;
  };
  for (const Point& p : {Point{192, 384, 16, 23.50}, Point{256, 512, 32, 24.24}, Point{384, 768, 64, 26.08},
                         Point{512, 1024, 128, 29.01}}) {
    MemoryEstimateInput in;
    in.cond_size = p.cond;
    in.noise_size = p.noise;
    in.lora_rank = p.rank;
    in.gradient_checkpointing = true;
    const int64_t without = estimate_memory(in).activations;
    in.checkpoint_attention = true;
    const MemoryEstimate m = estimate_memory(in);
    const double tokens = static_cast<double>(in.tokens() * in.batch), H = 3072, blocks = 57, heads = 24;
    EXPECT_NEAR(static_cast<double>(m.activations - without), tokens * blocks * (H * 2 + heads * 4), 1.0) << p.noise;
    const double got = static_cast<double>(m.allocated()) / (1ll << 30);
    EXPECT_NEAR(got, p.gib, 0.03 * p.gib) << p.cond << "/" << p.noise;
  }
}

TEST(MemoryEstimate, BudgetIsMetOrRefused) {
  MemoryEstimateInput in;
  in.cond_size = 256;
  in.noise_size = 512;
  in.lora_rank = 32;
  in.gradient_checkpointing = true;
  in.low_memory.base_precision = "fp8";
  for (const char* budget : {"14GiB", "7GiB", "5GiB"}) {
    in.low_memory.max_gpu_memory = budget;
    const MemoryEstimate m = estimate_memory(in);
    EXPECT_LE(m.driver(), in.low_memory.max_gpu_memory_bytes()) << budget;
    EXPECT_GT(m.streamed_blocks, 0) << budget;
    EXPECT_EQ(m.bytes_streamed_per_step, 2 * m.host_weights);
  }
  in.low_memory.max_gpu_memory = "1GiB";
  EXPECT_THROW(estimate_memory(in), Error);
  // Tokens: text + noise + condition.
  EXPECT_EQ(in.tokens(), 512 + 32 * 32 + 16 * 16);
}

TEST(MemoryEstimate, EstimateAndDoctorCommands) {
  const std::string bin = FLUXTRAIN_BIN, src = FLUXTRAIN_SOURCE_DIR;
  std::string out;
  ASSERT_EQ(run_command(bin + " estimate --config " + src + "/configs/ultra-low.ini --json", &out), 0) << out;
  const auto j = nlohmann::json::parse(out.substr(out.find('{')));
  EXPECT_GT(j["estimate_driver_gib"].get<double>(), 1.0);
  EXPECT_EQ(run_command(bin + " estimate --base_precision fp4", &out), 2) << out;
  EXPECT_NE(out.find("--base_precision must be bf16 or fp8"), std::string::npos) << out;
  ASSERT_EQ(run_command(bin + " doctor --no_bandwidth --configs " + src + "/configs --gpu_memory 16GiB", &out), 0) << out;
  EXPECT_NE(out.find("use "), std::string::npos) << out;
  EXPECT_NE(out.find("command: "), std::string::npos) << out;
  EXPECT_EQ(run_command(bin + " doctor --no_bandwidth --configs " + src + "/configs --gpu_memory 1GiB", &out), 2)
      << out;
  EXPECT_NE(out.find("no preset fits in 1.00 GiB"), std::string::npos) << out;
}

// Sharded over N ranks (--shard_weights, or any multi-rank run) each block counts 1/N of its
// bytes: on the device when resident, in host memory when streamed (each rank streams its shard).
TEST(MemoryEstimate, ShardedStreamedBlocksCountOneNth) {
  MemoryEstimateInput in;  // FLUX.1-dev
  in.low_memory.base_precision = "fp8";
  const MemoryEstimate whole = estimate_memory(in);
  in.world_size = 4;
  in.shard_weights = true;
  const MemoryEstimate sharded = estimate_memory(in);
  in.low_memory.blocks_to_swap = -1;
  const MemoryEstimate streamed = estimate_memory(in);
  in.world_size = 1;
  const MemoryEstimate alone = estimate_memory(in);  // streamed, one process
  EXPECT_LT(sharded.weights, whole.weights);
  EXPECT_LT(streamed.weights, sharded.weights);
  EXPECT_EQ(streamed.streamed_blocks, in.model.num_blocks());
  // Every block streamed: the host holds 1/4 of what one process streaming alone holds.
  EXPECT_NEAR(static_cast<double>(streamed.host_weights), static_cast<double>(alone.host_weights) / 4,
              static_cast<double>(in.model.num_blocks()));
  EXPECT_EQ(streamed.bytes_streamed_per_step, 2 * streamed.host_weights);
  // A budget between "all streamed" and "all resident" streams some of the shards, and fits.
  in.world_size = 4;
  in.low_memory.blocks_to_swap = 0;
  in.low_memory.max_gpu_memory = std::to_string((sharded.driver() + streamed.driver()) / 2);
  const MemoryEstimate some = estimate_memory(in);
  EXPECT_GT(some.streamed_blocks, 0);
  EXPECT_LT(some.streamed_blocks, in.model.num_blocks());
  EXPECT_LE(some.driver(), in.low_memory.max_gpu_memory_bytes());
}
