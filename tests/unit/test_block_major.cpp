// Block-major accumulation (model/flux_block_major.h): k micro-batches through the model block
// by block give the same outputs and accumulated gradients as k ordinary forward/backward
// passes (float64, 1e-12 relative), and a streamed block is copied once per pass, not k times.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "core/error.h"
#include "dist/offloaded_weights.h"
#include "model/flux_block_major.h"
#include "support/provider_check.h"
#include "support/test_util.h"

using namespace fluxtrain;
using namespace fluxtrain::provider_check;

namespace {

constexpr int kMicro = 3;

struct Accumulated {
  std::vector<at::Tensor> outs, grads;
  at::Tensor txt_grad0;
};

at::Tensor projection(const at::Tensor& out, int m) {
  auto gen = at::detail::createCPUGenerator(900 + m);
  return at::randn(out.sizes(), gen, at::TensorOptions().dtype(at::kDouble));
}

Accumulated ordinary(const FluxConfig& cfg, BlockWeights& w, bool ckpt) {
  LoraSet lora = make_lora(cfg, 77, at::kDouble);
  Accumulated r;
  ForwardOptions o;
  o.gradient_checkpointing = ckpt;
  std::vector<FluxInputs> in;
  for (int m = 0; m < kMicro; ++m) in.push_back(make_inputs(cfg, 600 + m, at::kDouble));
  in[0].txt.set_requires_grad(true);
  for (int m = 0; m < kMicro; ++m) {
    at::Tensor out = flux_forward(cfg, w, &lora, in[m], o);
    (out * projection(out, m)).sum().backward();
    r.outs.push_back(out.detach());
  }
  for (const at::Tensor& p : lora.parameters()) r.grads.push_back(p.grad());
  r.txt_grad0 = in[0].txt.grad();
  return r;
}

Accumulated block_major(const FluxConfig& cfg, BlockWeights& w, bool ckpt) {
  LoraSet lora = make_lora(cfg, 77, at::kDouble);
  Accumulated r;
  ForwardOptions o;
  o.gradient_checkpointing = ckpt;
  std::vector<FluxInputs> in;
  for (int m = 0; m < kMicro; ++m) in.push_back(make_inputs(cfg, 600 + m, at::kDouble));
  in[0].txt.set_requires_grad(true);
  std::vector<at::Tensor> outs = flux_forward_block_major(cfg, w, &lora, in, o);
  at::Tensor loss = at::zeros({}, at::kDouble);
  for (int m = 0; m < kMicro; ++m) loss = loss + (outs[m] * projection(outs[m], m)).sum();
  loss.backward();
  for (const at::Tensor& o2 : outs) r.outs.push_back(o2.detach());
  for (const at::Tensor& p : lora.parameters()) r.grads.push_back(p.grad());
  r.txt_grad0 = in[0].txt.grad();
  return r;
}

void expect_close(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  ASSERT_TRUE(got.defined() && want.defined()) << what;
  EXPECT_LE(rel_err(got, want), 1e-12) << what;
}

}  // namespace

TEST(BlockMajor, EqualsOrdinaryAccumulationInFloat64) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights w(init_random_weights(cfg, 51, at::kDouble), cfg.depth, cfg.depth_single);
  for (bool ckpt : {false, true}) {
    SCOPED_TRACE(ckpt ? "checkpointing" : "no checkpointing");
    const Accumulated want = ordinary(cfg, w, ckpt);
    const Accumulated got = block_major(cfg, w, ckpt);
    for (int m = 0; m < kMicro; ++m) expect_close(got.outs[m], want.outs[m], "output " + std::to_string(m));
    expect_close(got.txt_grad0, want.txt_grad0, "txt gradient");
    ASSERT_EQ(got.grads.size(), want.grads.size());
    int nonzero = 0;
    for (size_t k = 0; k < want.grads.size(); ++k) {
      if (!want.grads[k].defined()) continue;
      expect_close(got.grads[k], want.grads[k], "lora gradient " + std::to_string(k));
      nonzero += want.grads[k].abs().max().item<double>() > 0;
    }
    EXPECT_GT(nonzero, static_cast<int>(want.grads.size()) / 2);
  }
}

TEST(BlockMajor, StreamsEachBlockOncePerPass) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights resident(init_random_weights(cfg, 52, at::kDouble), cfg.depth, cfg.depth_single);
  const int n = static_cast<int>(cfg.num_blocks());
  for (bool ckpt : {false, true}) {
    SCOPED_TRACE(ckpt ? "checkpointing" : "no checkpointing");
    dist::OffloadOptions o;
    o.prefetch = 0;  // one slot: every change of block is a copy
    dist::OffloadedBlockWeights a(resident.globals(), n, [&](int i) { return resident.blocks()[i]; }, o);
    dist::OffloadedBlockWeights b(resident.globals(), n, [&](int i) { return resident.blocks()[i]; }, o);
    const Accumulated want = ordinary(cfg, a, ckpt);
    const Accumulated got = block_major(cfg, b, ckpt);
    EXPECT_EQ(b.stats().copies, 2 * n - 1) << "forward n, backward n - 1 (the last block is still there)";
    // Ordinary order: every micro-batch streams the model again (its forward finds block 0,
    // left by the previous backward).
    EXPECT_EQ(a.stats().copies, (2 * n - 1) + (kMicro - 1) * (2 * n - 2));
    for (size_t k = 0; k < want.grads.size(); ++k)
      if (want.grads[k].defined()) expect_close(got.grads[k], want.grads[k], "lora gradient " + std::to_string(k));
  }
}
