// The fp8 provider (dist/fp8_weights.h) against the resident provider holding the same
// dequantised weights: bit-identical output, input gradient and LoRA gradients, forward and
// backward, with and without activation checkpointing, for both scalings.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdio>
#include <cstdlib>

#include "core/error.h"
#include "dist/fp8_weights.h"
#include "dist/low_memory_weights.h"
#include "support/provider_check.h"
#include "support/test_util.h"

using namespace fluxtrain;
using namespace fluxtrain::provider_check;

namespace {

// A full BFL-named map from globals and per-block maps.
TensorMap join(const TensorMap& globals, const std::vector<TensorMap>& blocks, int64_t depth, at::ScalarType dt) {
  TensorMap full;
  for (const auto& [k, v] : globals) full.emplace(k, v.to(dt));
  for (size_t i = 0; i < blocks.size(); ++i)
    for (const auto& [k, v] : blocks[i]) full.emplace(block_prefix(static_cast<int>(i), depth) + k, v);
  return full;
}

struct Fp8Case {
  kernels::Fp8Scaling scaling;
  bool modulation;
  at::ScalarType dtype;
};

void check_case(const Fp8Case& c) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 11, at::kFloat), cfg.depth, cfg.depth_single);
  dist::Fp8WeightsOptions fo;
  fo.scaling = c.scaling;
  fo.quantise_modulation = c.modulation;
  std::vector<TensorMap> stored, dequantised;
  for (const TensorMap& b : original.blocks()) {
    stored.push_back(dist::quantise_block_fp8(b, fo, c.dtype));
    dequantised.push_back(dist::dequantise_block_fp8(stored.back(), c.dtype));
  }
  // What is quantised: the linears, modulation only when asked.
  const TensorMap& b0 = stored[0];
  EXPECT_EQ(b0.at("img_attn.qkv.weight").scalar_type(), at::kFloat8_e4m3fn);
  EXPECT_EQ(b0.at("img_mod.lin.weight").scalar_type(), c.modulation ? at::kFloat8_e4m3fn : c.dtype);
  EXPECT_EQ(b0.at("img_attn.norm.query_norm.scale").scalar_type(), c.dtype);
  EXPECT_EQ(stored[cfg.depth].at("linear1.weight").scalar_type(), at::kFloat8_e4m3fn);

  ResidentBlockWeights reference(join(original.globals(), dequantised, cfg.depth, c.dtype), cfg.depth,
                                 cfg.depth_single);
  dist::Fp8BlockWeights fp8(
      std::make_unique<ResidentBlockWeights>(join(original.globals(), stored, cfg.depth, c.dtype), cfg.depth,
                                             cfg.depth_single),
      c.dtype, at::kCPU);
  for (int variant = 0; variant < 3; ++variant) {
    const bool ckpt = variant == 1, repeat = variant == 2;
    SCOPED_TRACE(std::string(ckpt ? "checkpointing" : "no checkpointing") + (repeat ? ", repeated forward" : ""));
    Result want = run(cfg, reference, ckpt, 100, c.dtype);
    Result got = run(cfg, fp8, ckpt, 100, c.dtype, repeat);
    expect_identical(got, want);
  }
  // The quantisation error itself is small against the unquantised model (a sanity bound; the
  // FLUX.1-dev figure is measured on the GPU).
  ResidentBlockWeights plain(original.full(), cfg.depth, cfg.depth_single);
  plain.to(at::TensorOptions().dtype(c.dtype));
  at::NoGradGuard ng;
  const FluxInputs in = make_inputs(cfg, 100, c.dtype);
  const LoraSet lora = make_lora(cfg, 77, c.dtype);
  const double err = rel_err(flux_forward(cfg, fp8, &lora, in), flux_forward(cfg, plain, &lora, in));
  EXPECT_GT(err, 0.0);
  EXPECT_LT(err, 0.1);
}

}  // namespace

TEST(Fp8Weights, PerChannelMatchesResidentDequantisedBitwise) {
  check_case({kernels::Fp8Scaling::PerChannel, false, at::kDouble});
}
TEST(Fp8Weights, PerTensorWithModulationMatchesResidentDequantisedBitwise) {
  check_case({kernels::Fp8Scaling::PerTensor, true, at::kDouble});
}
TEST(Fp8Weights, Float32ComputeMatchesResidentDequantisedBitwise) {
  check_case({kernels::Fp8Scaling::PerChannel, false, at::kFloat});
}

TEST(Fp8Weights, OneSlotDequantisesEachBlockOncePerPass) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 12, at::kFloat), cfg.depth, cfg.depth_single);
  std::vector<TensorMap> stored;
  for (const TensorMap& b : original.blocks()) stored.push_back(dist::quantise_block_fp8(b, {}, at::kFloat));
  std::vector<std::vector<dist::SlotTensorSpec>> specs;
  for (const TensorMap& s : stored) specs.push_back(dist::fp8_compute_specs(s, at::kFloat));
  dist::Fp8BlockWeights fp8(
      std::make_unique<ResidentBlockWeights>(join(original.globals(), stored, cfg.depth, at::kFloat), cfg.depth,
                                             cfg.depth_single),
      at::kFloat, at::kCPU, specs);
  run(cfg, fp8, /*ckpt=*/true, 3, at::kFloat);
  // Forward dequantises every block, backward every block but the last (still in the slot).
  const int n = static_cast<int>(cfg.num_blocks());
  EXPECT_EQ(fp8.stats().dequantised_blocks, 2 * n - 1);
  // A block acquired twice is a caller bug.
  fp8.acquire(0);
  EXPECT_THROW(fp8.acquire(0), Error);
  fp8.release(0);
  EXPECT_THROW(fp8.release(0), Error);
}

// The fp8 output error against bf16 at FLUX.1-dev size on a fixed input (random weights; 40+ GB
// of GPU memory): printed for docs/memory.md. Opt-in: FLUXTRAIN_FP8_FLUX_DEV=1
// (bench/gpu_memory_tiers.sh sets it).
TEST(Fp8Weights, FluxDevOutputErrorOnCuda) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA() || !std::getenv("FLUXTRAIN_FP8_FLUX_DEV")) GTEST_SKIP() << "set FLUXTRAIN_FP8_FLUX_DEV=1 on a GPU";
  const FluxConfig cfg = FluxConfig::preset("flux-dev");
  const at::Device dev(at::kCUDA, 0);
  ResidentBlockWeights resident(init_random_weights(cfg, 0, at::kBFloat16, dev), cfg.depth, cfg.depth_single);
  // 512 px target, 256 px condition, 512 text tokens, batch 1.
  const auto o = at::TensorOptions().dtype(at::kDouble);
  auto gen = at::detail::createCPUGenerator(7);
  FluxInputs in;
  in.img = at::randn({1, 32 * 32, cfg.in_channels}, gen, o).to(at::kBFloat16);
  in.img_ids = noise_position_ids(32, 32);
  in.txt = at::randn({1, 512, cfg.context_in_dim}, gen, o).to(at::kBFloat16);
  in.txt_ids = text_position_ids(512);
  in.y = at::randn({1, cfg.vec_in_dim}, gen, o).to(at::kBFloat16);
  in.timesteps = at::full({1}, 0.5, o).to(at::kBFloat16);
  in.guidance = at::full({1}, 1.0, o).to(at::kBFloat16);
  in.cond.push_back(at::randn({1, 16 * 16, cfg.in_channels}, gen, o).to(at::kBFloat16));
  in.cond_ids.push_back(subject_position_ids(16, 16));
  at::NoGradGuard ng;
  const at::Tensor want = flux_forward(cfg, resident, nullptr, in).to(at::kDouble);
  dist::WeightsSource src;
  src.globals = resident.globals();
  src.num_blocks = resident.num_blocks();
  src.load_block = [&](int i) { return resident.blocks()[i]; };
  for (const char* scaling : {"channel", "tensor"})
    for (int variant = 0; variant < 3; ++variant) {
      // 0: blocks dequantised to bf16; 1: with fp8 modulation; 2: fp8 GEMMs (--fp8_matmul).
      const bool modulation = variant == 1, matmul = variant == 2;
      dist::LowMemoryOptions lo;
      lo.base_precision = "fp8";
      lo.fp8_scaling = scaling;
      lo.fp8_modulation = modulation;
      lo.fp8_matmul = matmul;
      dist::LowMemoryPlan plan;
      auto w = dist::compose_low_memory_weights(src, lo, dev, at::kBFloat16, nullptr, 0, &plan);
      const at::Tensor got = flux_forward(cfg, *w, nullptr, in).to(at::kDouble);
      const double max_rel = rel_err(got, want);
      const double rms_rel = ((got - want).pow(2).mean() / want.pow(2).mean()).sqrt().item<double>();
      std::printf("fp8 FLUX.1-dev output vs bf16: scaling %s, modulation %s, products %s: max-abs rel %.4f, "
                  "rms rel %.4f, stored blocks %.2f GiB\n",
                  scaling, modulation ? "fp8" : "bf16", matmul ? "fp8 GEMMs" : "dequantised bf16", max_rel, rms_rel,
                  plan.stored_block_bytes / 1073741824.0);
      EXPECT_LT(rms_rel, 0.2);
    }
#endif
}
