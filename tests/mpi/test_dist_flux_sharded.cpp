// The FLUX transformer on sharded frozen weights: forward and backward of a tiny float64 model
// equal the resident ones (to 1e-12 relative), with and without activation checkpointing, in
// both LoRA modes. Each rank runs its own inputs; the weights are partitioned over all ranks.
#include <torch/csrc/autograd/autograd.h>

#include "dist/sharded_weights.h"
#include "model/flux_transformer.h"
#include "model/flux_weights.h"
#include "model/position_ids.h"
#include "tests/mpi/dist_test_util.h"

namespace fluxtrain::dist::testing {
namespace {

const auto kF64 = at::TensorOptions().dtype(at::kDouble);

FluxConfig deeper_tiny() {
  FluxConfig cfg = FluxConfig::preset("tiny");
  cfg.depth = 3;         // more blocks than gather slots, odd counts: slots are reused in
  cfg.depth_single = 4;  // forward and in backward, and the turn-around is not symmetric
  return cfg;
}

FluxInputs make_inputs(const FluxConfig& cfg, uint64_t seed, bool with_cond) {
  auto gen = at::detail::createCPUGenerator(seed);
  const int64_t B = 2, nh = 3, T = 5;
  FluxInputs in;
  in.img = at::randn({B, nh * nh, cfg.in_channels}, gen, kF64);
  in.img_ids = noise_position_ids(nh, nh);
  in.txt = at::randn({B, T, cfg.context_in_dim}, gen, kF64);
  in.txt_ids = text_position_ids(T);
  in.y = at::randn({B, cfg.vec_in_dim}, gen, kF64);
  in.timesteps = at::rand({B}, gen, kF64);
  in.guidance = at::full({B}, 1.0, kF64);
  if (with_cond) {
    in.cond.push_back(at::randn({B, 4, cfg.in_channels}, gen, kF64));
    in.cond_ids.push_back(subject_position_ids(2, 2));
    in.cond.push_back(at::randn({B, 9, cfg.in_channels}, gen, kF64));
    in.cond_ids.push_back(spatial_position_ids(3, 3, nh, nh));
  }
  return in;
}

LoraSet make_lora(const FluxConfig& cfg, LoraMode mode, uint64_t seed) {
  LoraConfig lc;
  lc.mode = mode;
  lc.lora_num = mode == LoraMode::EasyControl ? 2 : 1;
  lc.ranks.assign(lc.lora_num, 4);
  lc.alphas.assign(lc.lora_num, 2.0);
  LoraSet s = LoraSet::create(cfg, lc, seed, at::kDouble);
  auto gen = at::detail::createCPUGenerator(seed + 1);
  at::NoGradGuard ng;
  for (auto& a : s.adapters()) a.up.copy_(at::randn(a.up.sizes(), gen, kF64) * 0.3);  // non-zero: LoRA acts
  return s;
}

struct Result {
  at::Tensor out, txt_grad;
  std::vector<at::Tensor> lora_grads;
};

// interleave: a no-grad forward between forward and backward moves every block to the other
// gather slot, so backward finds its blocks in different memory than forward used.
Result run(const FluxConfig& cfg, BlockWeights& w, LoraMode mode, bool ckpt, bool with_cond, bool interleave = false,
           at::Device dev = at::kCPU) {
  FluxInputs in = make_inputs(cfg, 1000 + comm().rank(), with_cond);
  in.txt = in.txt.to(dev);
  in.txt.set_requires_grad(true);  // conditioning gradients (encoder rank) must match too
  LoraSet lora = make_lora(cfg, mode, 77);
  lora.to(at::TensorOptions().dtype(at::kDouble).device(dev));
  ForwardOptions o;
  o.gradient_checkpointing = ckpt;
  at::Tensor out = flux_forward(cfg, w, &lora, in, o);
  if (interleave) {
    at::NoGradGuard ng;
    flux_forward(cfg, w, &lora, in, o);
  }
  auto gen = at::detail::createCPUGenerator(5);
  at::Tensor r = at::randn(out.sizes(), gen, kF64).to(dev);
  (out * r).sum().backward();
  Result res{out.detach().cpu(), in.txt.grad().cpu(), {}};
  for (const at::Tensor& p : lora.parameters()) res.lora_grads.push_back(p.grad().defined() ? p.grad().cpu() : at::Tensor());
  return res;
}

void expect_rel(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  EXPECT_TRUE(got.defined() && want.defined()) << what;
  if (!got.defined() || !want.defined()) return;
  const double scale = want.abs().max().item<double>();
  EXPECT_TRUE(close(got, want, 0, 1e-12 * scale)) << what;
}

void compare(LoraMode mode, bool with_cond) {
  const FluxConfig cfg = deeper_tiny();
  const TensorMap full = init_random_weights(cfg, 11, at::kDouble);
  ResidentBlockWeights resident(full, cfg.depth, cfg.depth_single);
  ShardedBlockWeights sharded(comm(), resident.globals(), resident.blocks(), {});
  for (int variant = 0; variant < 3; ++variant) {
    const bool ckpt = variant == 1, interleave = variant == 2;
    SCOPED_TRACE(std::string(ckpt ? "checkpointing" : "no checkpointing") + (interleave ? ", interleaved" : ""));
    Result want = run(cfg, resident, mode, ckpt, with_cond);
    Result got = run(cfg, sharded, mode, ckpt, with_cond, interleave);
    expect_rel(got.out, want.out, "output");
    expect_rel(got.txt_grad, want.txt_grad, "txt gradient");
    EXPECT_EQ(got.lora_grads.size(), want.lora_grads.size());
    int nonzero = 0;
    for (size_t k = 0; k < std::min(got.lora_grads.size(), want.lora_grads.size()); ++k) {
      expect_rel(got.lora_grads[k], want.lora_grads[k], "lora gradient " + std::to_string(k));
      nonzero += want.lora_grads[k].defined() && want.lora_grads[k].abs().max().item<double>() > 0;
    }
    // Most LoRA gradients must be non-zero, or a wrong weight could go unnoticed.
    EXPECT_GT(nonzero, static_cast<int>(want.lora_grads.size()) / 2);
  }
  // Each block was gathered in forward and again in backward, never more than once per pass
  // (plus nothing wasted: prefetch always guessed right).
  const int n = static_cast<int>(cfg.num_blocks());
  EXPECT_LE(sharded.stats().gathers, 3 * (2 * n) + n);
  EXPECT_EQ(sharded.stats().wasted_prefetches, 0);
}

TEST(DistFluxSharded, EasyControlWithConditionsMatchesResident) { compare(LoraMode::EasyControl, true); }

// The same on the GPU with the NCCL communicator (skipped without NCCL or a GPU on every rank):
// sharded (NCCL gathers on the side stream) against resident weights on the same GPU.
TEST(DistFluxSharded, OnCudaWithNcclMatchesResident) {
  Communicator* nc = nccl_comm();
  if (!nc) GTEST_SKIP() << "no NCCL in this build or no GPU on some rank";
  const at::Device dev = nccl_device();
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights resident(init_random_weights(cfg, 13, at::kDouble), cfg.depth, cfg.depth_single);
  resident.to(at::TensorOptions().dtype(at::kDouble).device(dev));
  ShardedWeightsOptions opt;
  opt.device = dev;
  ShardedBlockWeights sharded(*nc, resident.globals(), resident.blocks(), opt);
  for (int variant = 0; variant < 3; ++variant) {
    const bool ckpt = variant == 1, interleave = variant == 2;
    SCOPED_TRACE(std::string(ckpt ? "checkpointing" : "no checkpointing") + (interleave ? ", interleaved" : ""));
    Result want = run(cfg, resident, LoraMode::EasyControl, ckpt, true, false, dev);
    Result got = run(cfg, sharded, LoraMode::EasyControl, ckpt, true, interleave, dev);
    expect_rel(got.out, want.out, "output");
    expect_rel(got.txt_grad, want.txt_grad, "txt gradient");
    for (size_t k = 0; k < std::min(got.lora_grads.size(), want.lora_grads.size()); ++k)
      expect_rel(got.lora_grads[k], want.lora_grads[k], "lora gradient " + std::to_string(k));
  }
  EXPECT_GT(sharded.stats().prefetch_hits, 0);
}
TEST(DistFluxSharded, StandardLoraMatchesResident) { compare(LoraMode::Standard, false); }

TEST(DistFluxSharded, InferenceWithoutGradMatchesResidentBitwise) {
  const FluxConfig cfg = deeper_tiny();
  const TensorMap full = init_random_weights(cfg, 12, at::kDouble);
  ResidentBlockWeights resident(full, cfg.depth, cfg.depth_single);
  ShardedBlockWeights sharded(comm(), resident.globals(), resident.blocks(), {});
  FluxInputs in = make_inputs(cfg, 2000 + comm().rank(), true);
  LoraSet lora = make_lora(cfg, LoraMode::EasyControl, 3);
  at::NoGradGuard ng;
  at::Tensor a = flux_forward(cfg, resident, &lora, in);
  at::Tensor b = flux_forward(cfg, sharded, &lora, in);
  EXPECT_TRUE(bit_equal(b, a));
  EXPECT_EQ(sharded.stats().gathers, cfg.num_blocks());
}

}  // namespace
}  // namespace fluxtrain::dist::testing
