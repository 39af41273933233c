// Header-only helpers for the BlockWeights provider tests (unit and mpi binaries): a tiny
// float64 FLUX model with more blocks than any provider has slots, deterministic inputs and
// LoRA, one forward + backward, and a bitwise comparison of output, input gradient and every
// LoRA gradient between two providers.
#pragma once
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "dist/low_memory_weights.h"
#include "model/flux_transformer.h"
#include "model/flux_weights.h"
#include "model/position_ids.h"

namespace fluxtrain::provider_check {

inline FluxConfig deeper_tiny() {
  FluxConfig cfg = FluxConfig::preset("tiny");
  cfg.depth = 3;         // more blocks than slots, odd counts: slots are reused in forward and
  cfg.depth_single = 4;  // backward, and the turn-around is not symmetric
  return cfg;
}

inline FluxInputs make_inputs(const FluxConfig& cfg, uint64_t seed, at::ScalarType dt) {
  const auto o = at::TensorOptions().dtype(at::kDouble);
  auto gen = at::detail::createCPUGenerator(seed);
  const int64_t B = 2, nh = 3, T = 5;
  FluxInputs in;
  in.img = at::randn({B, nh * nh, cfg.in_channels}, gen, o).to(dt);
  in.img_ids = noise_position_ids(nh, nh);
  in.txt = at::randn({B, T, cfg.context_in_dim}, gen, o).to(dt);
  in.txt_ids = text_position_ids(T);
  in.y = at::randn({B, cfg.vec_in_dim}, gen, o).to(dt);
  in.timesteps = at::rand({B}, gen, o).to(dt);
  in.guidance = at::full({B}, 1.0, o).to(dt);
  in.cond.push_back(at::randn({B, 4, cfg.in_channels}, gen, o).to(dt));
  in.cond_ids.push_back(subject_position_ids(2, 2));
  return in;
}

inline LoraSet make_lora(const FluxConfig& cfg, uint64_t seed, at::ScalarType dt) {
  LoraConfig lc;
  lc.mode = LoraMode::EasyControl;
  lc.lora_num = 1;
  lc.ranks.assign(1, 4);
  lc.alphas.assign(1, 2.0);
  LoraSet s = LoraSet::create(cfg, lc, seed, at::kDouble);
  auto gen = at::detail::createCPUGenerator(seed + 1);
  {
    at::NoGradGuard ng;
    for (auto& a : s.adapters()) a.up.copy_(at::randn(a.up.sizes(), gen, at::kDouble) * 0.3);  // LoRA acts
  }
  s.to(at::TensorOptions().dtype(dt));
  return s;
}

struct Result {
  at::Tensor out, txt_grad;
  std::vector<at::Tensor> lora_grads;
};

// Forward (+ backward of a fixed random projection of the output) on `w`. repeat_no_grad: a
// second, gradient-free forward between forward and backward moves blocks through the slots,
// so backward finds its blocks elsewhere than forward left them.
inline Result run(const FluxConfig& cfg, BlockWeights& w, bool ckpt, uint64_t input_seed, at::ScalarType dt,
                  bool repeat_no_grad = false) {
  FluxInputs in = make_inputs(cfg, input_seed, dt);
  in.txt.set_requires_grad(true);
  LoraSet lora = make_lora(cfg, 77, dt);
  ForwardOptions o;
  o.gradient_checkpointing = ckpt;
  at::Tensor out = flux_forward(cfg, w, &lora, in, o);
  if (repeat_no_grad) {
    at::NoGradGuard ng;
    flux_forward(cfg, w, &lora, in, o);
  }
  auto gen = at::detail::createCPUGenerator(5);
  at::Tensor r = at::randn(out.sizes(), gen, at::TensorOptions().dtype(at::kDouble)).to(dt);
  (out * r).sum().backward();
  Result res{out.detach(), in.txt.grad(), {}};
  for (const at::Tensor& p : lora.parameters()) res.lora_grads.push_back(p.grad());
  return res;
}

// A provider stack's source reading the blocks of r (which must outlive it), shapes included.
inline dist::WeightsSource source_of(ResidentBlockWeights& r) {
  dist::WeightsSource s;
  s.globals = r.globals();
  s.num_blocks = r.num_blocks();
  s.load_block = [&r](int i) { return r.blocks()[i]; };
  s.block_shapes = [&r](int i) {
    dist::BlockShapes sh;
    for (const auto& [k, v] : r.blocks()[i]) sh.emplace_back(k, v.sizes().vec());
    return sh;
  };
  return s;
}

inline bool bits_equal(const at::Tensor& a, const at::Tensor& b) {
  return a.defined() && b.defined() && a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         at::equal(a.contiguous().view(at::kByte), b.contiguous().view(at::kByte));
}

// Bitwise equality of output, txt gradient and every LoRA gradient; most LoRA gradients must be
// non-zero, or a wrong weight could go unnoticed.
inline void expect_identical(const Result& got, const Result& want) {
  EXPECT_TRUE(bits_equal(got.out, want.out)) << "output";
  EXPECT_TRUE(bits_equal(got.txt_grad, want.txt_grad)) << "txt gradient";
  ASSERT_EQ(got.lora_grads.size(), want.lora_grads.size());
  int nonzero = 0;
  for (size_t k = 0; k < want.lora_grads.size(); ++k) {
    if (!want.lora_grads[k].defined()) {
      EXPECT_FALSE(got.lora_grads[k].defined()) << "lora gradient " << k;
      continue;
    }
    EXPECT_TRUE(bits_equal(got.lora_grads[k], want.lora_grads[k])) << "lora gradient " << k;
    nonzero += want.lora_grads[k].abs().max().item<double>() > 0;
  }
  EXPECT_GT(nonzero, static_cast<int>(want.lora_grads.size()) / 2);
}

}  // namespace fluxtrain::provider_check
