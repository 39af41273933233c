// The fused kernels of issue 15 (kernels/modulated_layer_norm.*, kernels/qk_norm_rope.*):
//  - CPU: each reference path against a naive float64 recomputation from the formulas, forward
//    and backward (the backward against autograd of the naive formula), to 1e-12; the autograd
//    functions on CPU; the reference of the QK prologue against the unfused model ops, bit for bit.
//  - GPU (skipped without one): the CUDA kernels against the float64 reference from the same
//    bf16/float32 inputs, against the CPU reference in the same dtype, and the full autograd
//    functions (and the model blocks) on CUDA against CPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "kernels/modulated_layer_norm.h"
#include "kernels/qk_norm_rope.h"
#include "model/blocks.h"
#include "model/flux_weights.h"
#include "model/layers.h"
#include "model/rope.h"
#include "support/test_util.h"

using namespace fluxtrain;

namespace {

const auto kF64 = at::TensorOptions().dtype(at::kDouble);
constexpr double kEps = 1e-6;

// ---- naive float64 formulas -------------------------------------------------------------------

at::Tensor naive_modulated_layer_norm(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  at::Tensor mean = x.mean(-1, true);
  at::Tensor var = (x - mean).pow(2).mean(-1, true);  // biased
  return (x - mean) / at::sqrt(var + kEps) * (1 + scale) + shift;
}

at::Tensor naive_rms_norm(const at::Tensor& x, const at::Tensor& scale) {
  return x / at::sqrt(x.pow(2).mean(-1, true) + kEps) * scale;
}

// x [B, h, L, D], cos/sin [L, D/2]: (x0 c - x1 s, x0 s + x1 c) for each pair (2j, 2j+1).
at::Tensor naive_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t D = x.size(3);
  at::Tensor x0 = x.slice(3, 0, D, 2), x1 = x.slice(3, 1, D, 2);
  return at::stack({x0 * cos - x1 * sin, x0 * sin + x1 * cos}, -1).flatten(3);
}

// The model's prologue for streams concatenated along L, from the formulas.
std::array<at::Tensor, 3> naive_qk_norm_rope(const std::vector<kernels::QkvSegment>& segs, int64_t heads,
                                             const at::Tensor& cos, const at::Tensor& sin) {
  std::vector<at::Tensor> q, k, v;
  for (const auto& s : segs) {
    const int64_t B = s.qkv.size(0), L = s.qkv.size(1), D = s.qkv.size(2) / (3 * heads);
    at::Tensor t = s.qkv.reshape({B, L, 3, heads, D}).permute({2, 0, 3, 1, 4});
    q.push_back(naive_rms_norm(t[0], s.q_scale));
    k.push_back(naive_rms_norm(t[1], s.k_scale));
    v.push_back(t[2]);
  }
  return {naive_rope(at::cat(q, 2), cos, sin), naive_rope(at::cat(k, 2), cos, sin), at::cat(v, 2)};
}

// Random angles for L tokens and D/2 pairs: float64 and the float32 values the model stores.
void random_angles(int64_t L, int64_t D, at::Tensor* cos32, at::Tensor* sin32) {
  at::Tensor ang = at::rand({L, D / 2}, kF64) * 60 - 30;
  *cos32 = at::cos(ang).to(at::kFloat);
  *sin32 = at::sin(ang).to(at::kFloat);
}

// ---- comparison helpers (GPU tests) -----------------------------------------------------------

// max over elements of (|got - want| - rtol*|want|) / (atol_rel * max|want|): <= 1 passes.
double excess(const at::Tensor& got, const at::Tensor& want, double rtol, double atol_rel) {
  at::Tensor g = got.detach().cpu().to(at::kDouble), w = want.detach().cpu().to(at::kDouble);
  const double atol = atol_rel * std::max(w.abs().max().item<double>(), 1e-300);
  return (((g - w).abs() - rtol * w.abs()) / atol).max().item<double>();
}

// For rotated outputs: max |got - want| / |pair (2j, 2j+1) of want| (the rotation mixes a pair,
// so the error of either element is relative to the pair's magnitude).
double pair_err(const at::Tensor& got, const at::Tensor& want) {
  at::Tensor g = got.detach().cpu().to(at::kDouble), w = want.detach().cpu().to(at::kDouble);
  auto s = w.sizes().vec();
  s.back() /= 2;
  s.push_back(2);
  at::Tensor norm = w.reshape(s).pow(2).sum(-1, true).sqrt().expand(s).reshape(w.sizes());
  return ((g - w).abs() / norm.clamp_min(1e-30)).max().item<double>();
}

double equal_fraction(const at::Tensor& a, const at::Tensor& b) {
  return a.detach().cpu().eq(b.detach().cpu()).to(at::kDouble).mean().item<double>();
}

}  // namespace

// =============================== CPU: references vs the formulas ===============================

TEST(FusedModulatedLayerNorm, ReferenceMatchesNaiveFloat64) {
  at::manual_seed(1);
  const int64_t B = 2, L = 5, H = 12;
  // x as a narrowed view (non-contiguous rows), as the final layer's img = x.narrow(1, T, ...).
  at::Tensor xbig = (at::randn({B, L + 3, H}, kF64) * 2 + 0.7);
  at::Tensor x = xbig.narrow(1, 3, L).set_requires_grad(true);
  at::Tensor mod = at::randn({B, 1, 2 * H}, kF64) * 0.5;
  at::Tensor shift = mod.narrow(2, 0, H).clone().set_requires_grad(true);
  at::Tensor scale = mod.narrow(2, H, H).clone().set_requires_grad(true);
  at::Tensor gy = at::randn({B, L, H}, kF64);

  at::Tensor want = naive_modulated_layer_norm(x, shift, scale);
  auto want_g = torch::autograd::grad({want}, {x, shift, scale}, {gy}, /*retain_graph=*/true);

  auto [y, mean, rstd] = kernels::modulated_layer_norm_forward_reference(x.detach(), shift.detach(), scale.detach());
  EXPECT_EQ(mean.scalar_type(), at::kDouble);
  EXPECT_EQ(mean.sizes(), (std::vector<int64_t>{B, L}));
  EXPECT_LT(rel_err(y, want), 1e-12);
  EXPECT_LT(rel_err(mean, x.detach().mean(-1)), 1e-12);
  at::Tensor xd = x.detach();
  EXPECT_LT(rel_err(rstd, at::rsqrt((xd - xd.mean(-1, true)).pow(2).mean(-1) + kEps)), 1e-12);

  auto g = kernels::modulated_layer_norm_backward_reference(gy, x.detach(), scale.detach(), mean, rstd, true, true,
                                                            true);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(g[i].sizes(), want_g[i].sizes()) << i;
    EXPECT_LT(rel_err(g[i], want_g[i]), 1e-12) << i;
  }
  // Only the requested gradients.
  auto g2 = kernels::modulated_layer_norm_backward_reference(gy, x.detach(), scale.detach(), mean, rstd, true, false,
                                                             false);
  EXPECT_TRUE(g2[0].defined());
  EXPECT_FALSE(g2[1].defined());
  EXPECT_FALSE(g2[2].defined());
}

TEST(FusedModulatedLayerNorm, AutogradFunctionOnCpuMatchesNaiveFloat64) {
  at::manual_seed(2);
  const int64_t B = 3, L = 4, H = 7;  // odd H
  at::Tensor x = (at::randn({B, L, H}, kF64) - 1.5).set_requires_grad(true);
  at::Tensor shift = (at::randn({B, 1, H}, kF64) * 0.3).set_requires_grad(true);
  at::Tensor scale = (at::randn({B, 1, H}, kF64) * 0.3).set_requires_grad(true);
  at::Tensor gy = at::randn({B, L, H}, kF64);
  at::Tensor y = modulate_fused(x, shift, scale);
  at::Tensor want = naive_modulated_layer_norm(x, shift, scale);
  EXPECT_LT(rel_err(y, want), 1e-12);
  auto g = torch::autograd::grad({y}, {x, shift, scale}, {gy});
  auto wg = torch::autograd::grad({want}, {x, shift, scale}, {gy});
  for (int i = 0; i < 3; ++i) EXPECT_LT(rel_err(g[i], wg[i]), 1e-12) << i;

  // shift/scale without grad (the usual case): .backward() leaves them without one.
  at::Tensor x2 = x.detach().clone().set_requires_grad(true);
  at::Tensor sh2 = shift.detach(), sc2 = scale.detach();
  modulate_fused(x2, sh2, sc2).backward(gy);
  EXPECT_LT(rel_err(x2.grad(), wg[0]), 1e-12);
  EXPECT_FALSE(sh2.grad().defined());
}

// The residual form (x returned for the residual it feeds, x's two gradients summed inside the
// norm's dx): against autograd through x used twice, float64, 1e-12; and with only one of the
// outputs used.
TEST(FusedModulatedLayerNorm, ResidualNodeSumsBothGradients) {
  at::manual_seed(4);
  const int64_t B = 2, L = 5, H = 6;
  at::Tensor x = (at::randn({B, L, H}, kF64) + 0.5).set_requires_grad(true);
  at::Tensor shift = (at::randn({B, 1, H}, kF64) * 0.3).set_requires_grad(true);
  at::Tensor scale = (at::randn({B, 1, H}, kF64) * 0.3).set_requires_grad(true);
  at::Tensor gate = at::randn({B, 1, H}, kF64), gy = at::randn({B, L, H}, kF64), go = at::randn({B, L, H}, kF64);
  auto [r, y] = modulate_residual_fused(x, shift, scale);
  EXPECT_TRUE(at::equal(r, x));
  at::Tensor want_y = naive_modulated_layer_norm(x, shift, scale);
  EXPECT_LT(rel_err(y, want_y), 1e-12);
  // A block's use: out = r + gate * f(y), here f = identity scaled by go.
  at::Tensor out = at::addcmul(r, gate, y * go), want = at::addcmul(x, gate, want_y * go);
  auto g = torch::autograd::grad({out}, {x, shift, scale}, {gy});
  auto wg = torch::autograd::grad({want}, {x, shift, scale}, {gy});
  for (int i = 0; i < 3; ++i) EXPECT_LT(rel_err(g[i], wg[i]), 1e-12) << i;
  // Only the residual used, or only the norm.
  auto [r2, y2] = modulate_residual_fused(x, shift, scale);
  EXPECT_LT(rel_err(torch::autograd::grad({r2}, {x}, {gy})[0], gy), 1e-15);
  auto [r3, y3] = modulate_residual_fused(x, shift, scale);
  at::Tensor want_y3 = naive_modulated_layer_norm(x, shift, scale);
  EXPECT_LT(rel_err(torch::autograd::grad({y3}, {x}, {gy})[0], torch::autograd::grad({want_y3}, {x}, {gy})[0]), 1e-12);
}

TEST(FusedModulatedLayerNorm, ModulateOnCpuIsTheUnfusedExpression) {
  // CPU numerics are unchanged: modulate is still addcmul(shift, layer_norm(x), 1 + scale).
  at::manual_seed(3);
  for (auto dt : {at::kBFloat16, at::kFloat, at::kDouble}) {
    const int64_t B = 2, L = 6, H = 32;
    at::Tensor x = at::randn({B, L, H}).to(dt), shift = at::randn({B, 1, H}).to(dt), scale = at::randn({B, 1, H}).to(dt);
    at::Tensor want = at::addcmul(shift, at::layer_norm(x, {H}, {}, {}, 1e-6), 1 + scale);
    EXPECT_TRUE(at::equal(modulate(x, shift, scale), want)) << dt;
    // The fused function's CPU path rounds once: within one rounding of the dtype.
    const double tol = dt == at::kBFloat16 ? 1e-2 : dt == at::kFloat ? 1e-6 : 1e-14;
    EXPECT_LT(rel_err(modulate_fused(x, shift, scale), want), tol) << dt;
  }
}

TEST(FusedQkNormRope, ReferenceMatchesNaiveFloat64) {
  at::manual_seed(4);
  const int64_t B = 2, heads = 3, D = 10, Lt = 3, Li = 5;
  at::Tensor cos32, sin32;
  random_angles(Lt + Li, D, &cos32, &sin32);
  at::Tensor cos = cos32.to(at::kDouble), sin = sin32.to(at::kDouble);
  // The image stream as a narrowed GEMM output (row stride != 3*heads*D), like linear1's.
  at::Tensor qkv_t = at::randn({B, Lt, 3 * heads * D}, kF64).set_requires_grad(true);
  at::Tensor big = at::randn({B, Li, 3 * heads * D + 6}, kF64);
  at::Tensor qkv_i = big.narrow(2, 0, 3 * heads * D).set_requires_grad(true);
  std::vector<at::Tensor> sc;
  for (int i = 0; i < 4; ++i) sc.push_back((at::rand({D}, kF64) + 0.5).set_requires_grad(true));
  std::vector<kernels::QkvSegment> segs{{qkv_t, sc[0], sc[1]}, {qkv_i, sc[2], sc[3]}};
  std::vector<kernels::QkvSegment> dsegs{{qkv_t.detach(), sc[0].detach(), sc[1].detach()},
                                         {qkv_i.detach(), sc[2].detach(), sc[3].detach()}};

  auto want = naive_qk_norm_rope(segs, heads, cos, sin);
  auto got = kernels::qk_norm_rope_forward_reference(dsegs, heads, cos, sin);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(got[i].sizes(), (std::vector<int64_t>{B, heads, Lt + Li, D})) << i;
    EXPECT_TRUE(got[i].is_contiguous()) << i;
    EXPECT_LT(rel_err(got[i], want[i]), 1e-12) << i;
  }

  at::Tensor gq = at::randn_like(want[0]), gk = at::randn_like(want[1]), gv = at::randn_like(want[2]);
  auto wg = torch::autograd::grad({want[0], want[1], want[2]}, {qkv_t, qkv_i, sc[0], sc[1], sc[2], sc[3]},
                                  {gq, gk, gv}, /*retain_graph=*/true);
  std::vector<kernels::QkvSegmentNeeds> all{{true, true, true}, {true, true, true}};
  // dq as a transposed view ([B, L, h, D] memory), as flash attention hands gradients back.
  at::Tensor gq_t = gq.transpose(1, 2).contiguous().transpose(1, 2);
  auto g = kernels::qk_norm_rope_backward_reference(gq_t, gk, gv, dsegs, heads, cos, sin, all);
  EXPECT_LT(rel_err(g[0].qkv, wg[0]), 1e-12);
  EXPECT_LT(rel_err(g[1].qkv, wg[1]), 1e-12);
  EXPECT_LT(rel_err(g[0].q_scale, wg[2]), 1e-12);
  EXPECT_LT(rel_err(g[0].k_scale, wg[3]), 1e-12);
  EXPECT_LT(rel_err(g[1].q_scale, wg[4]), 1e-12);
  EXPECT_LT(rel_err(g[1].k_scale, wg[5]), 1e-12);

  // Undefined dq (q unused) = zero; only the requested gradients.
  auto wg2 = torch::autograd::grad({want[1], want[2]}, {qkv_t, qkv_i}, {gk, gv});
  std::vector<kernels::QkvSegmentNeeds> some{{true, false, false}, {true, false, false}};
  auto g2 = kernels::qk_norm_rope_backward_reference(at::Tensor(), gk, gv, dsegs, heads, cos, sin, some);
  EXPECT_LT(rel_err(g2[0].qkv, wg2[0]), 1e-12);
  EXPECT_LT(rel_err(g2[1].qkv, wg2[1]), 1e-12);
  EXPECT_FALSE(g2[0].q_scale.defined());
  EXPECT_FALSE(g2[1].k_scale.defined());
}

TEST(FusedQkNormRope, AutogradFunctionOnCpuMatchesNaiveFloat64) {
  at::manual_seed(5);
  const int64_t B = 1, heads = 2, D = 16, L = 6;
  at::Tensor cos32, sin32;
  random_angles(L, D, &cos32, &sin32);
  Rope r{cos32.to(at::kDouble), sin32.to(at::kDouble)};
  at::Tensor qkv = at::randn({B, L, 3 * heads * D}, kF64).set_requires_grad(true);
  at::Tensor qs = (at::rand({D}, kF64) + 0.5).set_requires_grad(true), ks = at::rand({D}, kF64) + 0.5;
  auto out = qk_norm_rope({{qkv, qs, ks}}, heads, r);
  auto want = naive_qk_norm_rope({{qkv, qs, ks}}, heads, r.cos, r.sin);
  for (int i = 0; i < 3; ++i) EXPECT_LT(rel_err(out[i], want[i]), 1e-12) << i;
  at::Tensor gk = at::randn_like(want[1]), gv = at::randn_like(want[2]);
  // q unused (its gradient undefined), ks frozen.
  torch::autograd::backward({out[1], out[2]}, {gk, gv});
  auto wg = torch::autograd::grad({want[1], want[2]}, {qkv}, {gk, gv});
  EXPECT_LT(rel_err(qkv.grad(), wg[0]), 1e-12);
  ASSERT_TRUE(qs.grad().defined());
  EXPECT_EQ(qs.grad().abs().max().item<double>(), 0.0);  // q unused: its scale's gradient is zero
  EXPECT_FALSE(ks.grad().defined());
}

// The reference is the unfused model's op sequence (split_heads' rms_norm + cast, cat, apply_rope):
// on CPU, in every dtype, bit for bit, gradients included.
TEST(FusedQkNormRope, CpuReferenceEqualsUnfusedModelOps) {
  at::manual_seed(6);
  for (auto dt : {at::kBFloat16, at::kFloat}) {
    const int64_t B = 2, heads = 4, D = 16, Lt = 3, Li = 9;
    at::Tensor cos32, sin32;
    random_angles(Lt + Li, D, &cos32, &sin32);
    Rope r{cos32, sin32};
    at::Tensor t0 = at::randn({B, Lt, 3 * heads * D}).to(dt), i0 = at::randn({B, Li, 3 * heads * D}).to(dt);
    at::Tensor s0 = (at::rand({D}) + 0.5).to(dt), s1 = (at::rand({D}) + 0.5).to(dt);
    at::Tensor s2 = (at::rand({D}) + 0.5).to(dt), s3 = (at::rand({D}) + 0.5).to(dt);
    at::Tensor gq = at::randn({B, heads, Lt + Li, D}).to(dt), gk = at::randn({B, heads, Lt + Li, D}).to(dt);
    at::Tensor gv = at::randn({B, heads, Lt + Li, D}).to(dt);

    at::Tensor t1 = t0.clone().set_requires_grad(true), i1 = i0.clone().set_requires_grad(true);
    at::Tensor qsi = s2.clone().set_requires_grad(true);
    auto split = [&](const at::Tensor& qkv, const at::Tensor& qs, const at::Tensor& ks) {
      const int64_t L = qkv.size(1);
      at::Tensor t = qkv.view({B, L, 3, heads, D}).permute({2, 0, 3, 1, 4});
      at::Tensor v = t[2];
      return std::array<at::Tensor, 3>{rms_norm(t[0], qs).to(v.scalar_type()), rms_norm(t[1], ks).to(v.scalar_type()),
                                       v};
    };
    auto th = split(t1, s0, s1), ih = split(i1, qsi, s3);
    at::Tensor q = apply_rope(at::cat({th[0], ih[0]}, 2), r), k = apply_rope(at::cat({th[1], ih[1]}, 2), r);
    at::Tensor v = at::cat({th[2], ih[2]}, 2);
    torch::autograd::backward({q, k, v}, {gq, gk, gv});

    at::Tensor t2 = t0.clone().set_requires_grad(true), i2 = i0.clone().set_requires_grad(true);
    at::Tensor qsi2 = s2.clone().set_requires_grad(true);
    auto f = qk_norm_rope({{t2, s0, s1}, {i2, qsi2, s3}}, heads, r);
    EXPECT_TRUE(at::equal(f[0], q)) << dt;
    EXPECT_TRUE(at::equal(f[1], k)) << dt;
    EXPECT_TRUE(at::equal(f[2], v)) << dt;
    torch::autograd::backward({f[0], f[1], f[2]}, {gq, gk, gv});
    EXPECT_TRUE(at::equal(t2.grad(), t1.grad())) << dt;
    EXPECT_TRUE(at::equal(i2.grad(), i1.grad())) << dt;
    EXPECT_TRUE(at::equal(qsi2.grad(), qsi.grad())) << dt;
  }
}

// qk_norm_rope_split (a block's joint prologue) against what the blocks did before it: one prologue
// for text+image, one for the condition, keys and values concatenated, on CPU, bit for bit in
// bf16 and float32, gradients included (the pieces' sums round once, as autograd's sum does).
TEST(FusedQkNormRope, SplitEqualsSeparateProloguesAndConcatenation) {
  at::manual_seed(8);
  for (auto dt : {at::kBFloat16, at::kFloat}) {
    const int64_t B = 2, heads = 2, D = 16, Lt = 3, Li = 6, Lc = 4, W = 3 * heads * D;
    at::Tensor cm32, sm32, cc32, sc32;
    random_angles(Lt + Li, D, &cm32, &sm32);
    random_angles(Lc, D, &cc32, &sc32);
    const Rope rm{cm32, sm32}, rc{cc32, sc32}, ra = rope_cat({rm, rc});
    at::Tensor t0 = at::randn({B, Lt, W}).to(dt), i0 = at::randn({B, Li, W}).to(dt), c0 = at::randn({B, Lc, W}).to(dt);
    std::vector<at::Tensor> sc;
    for (int i = 0; i < 4; ++i) sc.push_back((at::rand({D}) + 0.5).to(dt));
    const int64_t Lm = Lt + Li;
    at::Tensor gqm = at::randn({B, heads, Lm, D}).to(dt), gka = at::randn({B, heads, Lm + Lc, D}).to(dt);
    at::Tensor gva = at::randn({B, heads, Lm + Lc, D}).to(dt), gqc = at::randn({B, heads, Lc, D}).to(dt);
    at::Tensor gkc = at::randn({B, heads, Lc, D}).to(dt), gvc = at::randn({B, heads, Lc, D}).to(dt);
    auto leaves = [&] {
      return std::vector<at::Tensor>{t0.clone().set_requires_grad(true), i0.clone().set_requires_grad(true),
                                     c0.clone().set_requires_grad(true)};
    };
    auto a = leaves();
    auto m = qk_norm_rope({{a[0], sc[0], sc[1]}, {a[1], sc[2], sc[3]}}, heads, rm);
    auto c = qk_norm_rope({{a[2], sc[2], sc[3]}}, heads, rc);
    at::Tensor k_all = at::cat({m[1], c[1]}, 2), v_all = at::cat({m[2], c[2]}, 2);
    torch::autograd::backward({m[0], k_all, v_all, c[0], c[1], c[2]}, {gqm, gka, gva, gqc, gkc, gvc});

    auto b = leaves();
    const SplitQkv s =
        qk_norm_rope_split({{b[0], sc[0], sc[1]}, {b[1], sc[2], sc[3]}, {b[2], sc[2], sc[3]}}, heads, ra, Lm);
    EXPECT_TRUE(at::equal(s.q_main, m[0])) << dt;
    EXPECT_TRUE(at::equal(s.k_all, k_all)) << dt;
    EXPECT_TRUE(at::equal(s.v_all, v_all)) << dt;
    EXPECT_TRUE(at::equal(s.q_cond, c[0])) << dt;
    EXPECT_TRUE(at::equal(s.k_cond, c[1])) << dt;
    EXPECT_TRUE(at::equal(s.v_cond, c[2])) << dt;
    torch::autograd::backward({s.q_main, s.k_all, s.v_all, s.q_cond, s.k_cond, s.v_cond},
                              {gqm, gka, gva, gqc, gkc, gvc});
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(at::equal(b[i].grad(), a[i].grad())) << dt << " stream " << i;

    // The condition's queries unused (the last single block): their gradient piece is absent.
    auto d = leaves();
    const SplitQkv u =
        qk_norm_rope_split({{d[0], sc[0], sc[1]}, {d[1], sc[2], sc[3]}, {d[2], sc[2], sc[3]}}, heads, ra, Lm);
    torch::autograd::backward({u.q_main, u.k_all, u.v_all}, {gqm, gka, gva});
    auto e = leaves();
    auto m2 = qk_norm_rope({{e[0], sc[0], sc[1]}, {e[1], sc[2], sc[3]}}, heads, rm);
    auto c2 = qk_norm_rope({{e[2], sc[2], sc[3]}}, heads, rc);
    torch::autograd::backward({m2[0], at::cat({m2[1], c2[1]}, 2), at::cat({m2[2], c2[2]}, 2)}, {gqm, gka, gva});
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(at::equal(d[i].grad(), e[i].grad())) << dt << " no q_cond, stream " << i;
  }
}

// ================================= GPU: CUDA vs the references ==================================

#ifdef FLUXTRAIN_WITH_CUDA
namespace {

const char* dt_name(at::ScalarType dt) { return dt == at::kBFloat16 ? "bf16" : dt == at::kHalf ? "f16" : "f32"; }

}  // namespace
#endif

// Tolerances (outputs in dtype T, truth = float64 reference from the same T inputs):
//   y, dx, dshift, dscale: |got - want| <= rtol*|want| + atol*max|want|, with rtol one ulp of T
//   (bf16 8e-3, f32 1e-5) and atol 1e-5 (float32 accumulation over H or L terms).
//   mean, rstd (float32): 1e-5 relative.
TEST(FusedKernels, ModulatedLayerNormCudaMatchesReference) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(11);
  struct Shape {
    int64_t B, L, H;
  };
  for (auto dt : {at::kBFloat16, at::kFloat}) {
    const double rtol = dt == at::kBFloat16 ? 8e-3 : 1e-5, atol = 1e-5;
    for (Shape s : {Shape{1, 1, 3072}, Shape{2, 7, 3072}, Shape{2, 1536, 3072}, Shape{1, 5, 10}, Shape{2, 3, 7}}) {
      const std::string what = std::string(dt_name(dt)) + " B" + std::to_string(s.B) + " L" + std::to_string(s.L) +
                               " H" + std::to_string(s.H);
      at::Tensor x = (at::randn({s.B, s.L, s.H}) * 2 + 0.5).to(dt);
      at::Tensor mod = (at::randn({s.B, 1, 3 * s.H}) * 0.5).to(dt);  // chunks of one modulation tensor
      at::Tensor shift = mod.narrow(2, 0, s.H), scale = mod.narrow(2, s.H, s.H);
      at::Tensor dy = at::randn({s.B, s.L, s.H}).to(dt);
      auto xc = x.cuda(), mc = mod.cuda(), dyc = dy.cuda();
      auto shc = mc.narrow(2, 0, s.H), scc = mc.narrow(2, s.H, s.H);
      ASSERT_TRUE(kernels::modulated_layer_norm_cuda_supported(xc, shc, scc)) << what;

      auto ref = kernels::modulated_layer_norm_forward_reference(x.to(at::kDouble), shift.to(at::kDouble),
                                                                 scale.to(at::kDouble));
      auto got = kernels::modulated_layer_norm_forward_cuda(xc, shc, scc);
      EXPECT_EQ(got[0].scalar_type(), dt);
      EXPECT_LE(excess(got[0], ref[0], rtol, atol), 1.0) << what << " y";
      EXPECT_LT(rel_err(got[1].cpu(), ref[1]), 1e-5) << what << " mean";
      EXPECT_LT(rel_err(got[2].cpu(), ref[2]), 1e-5) << what << " rstd";

      auto gref = kernels::modulated_layer_norm_backward_reference(dy.to(at::kDouble), x.to(at::kDouble),
                                                                   scale.to(at::kDouble), ref[1], ref[2], true, true,
                                                                   true);
      auto g = kernels::modulated_layer_norm_backward_cuda(dyc, xc, scc, got[1], got[2], true, true, true);
      const char* names[] = {" dx", " dshift", " dscale"};
      for (int i = 0; i < 3; ++i) {
        ASSERT_TRUE(g[i].defined()) << what << names[i];
        EXPECT_EQ(g[i].sizes(), gref[i].sizes()) << what << names[i];
        EXPECT_LE(excess(g[i], gref[i], rtol, atol), 1.0) << what << names[i];
      }
      // With an added gradient (the residual's): dx + dx_add, before rounding.
      at::Tensor dadd = at::randn({s.B, s.L, s.H}).to(dt);
      auto garef = kernels::modulated_layer_norm_backward_reference(dy.to(at::kDouble), x.to(at::kDouble),
                                                                    scale.to(at::kDouble), ref[1], ref[2], true, false,
                                                                    false, dadd.to(at::kDouble));
      auto ga = kernels::modulated_layer_norm_backward_cuda(dyc, xc, scc, got[1], got[2], true, false, false,
                                                           dadd.cuda());
      EXPECT_LE(excess(ga[0], garef[0], rtol, atol), 1.0) << what << " dx + dx_add";
      auto g1 = kernels::modulated_layer_norm_backward_cuda(dyc, xc, scc, got[1], got[2], false, true, false);
      EXPECT_FALSE(g1[0].defined());
      EXPECT_TRUE(at::equal(g1[1], g[1])) << what;  // deterministic
      EXPECT_FALSE(g1[2].defined());
    }
  }
#endif
}

// The full autograd function: .backward() on CUDA (bf16/f32) against CPU float64 from the same
// inputs (tolerances as above), and modulate() on CUDA takes the fused path.
TEST(FusedKernels, ModulateAutogradCudaMatchesCpu) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(12);
  for (auto dt : {at::kBFloat16, at::kFloat}) {
    const double rtol = dt == at::kBFloat16 ? 8e-3 : 1e-5, atol = 1e-5;
    const int64_t B = 2, L = 7, H = 3072;
    at::Tensor x = (at::randn({B, L, H}) * 2 + 0.5).to(dt), dy = at::randn({B, L, H}).to(dt);
    at::Tensor shift = (at::randn({B, 1, H}) * 0.5).to(dt), scale = (at::randn({B, 1, H}) * 0.5).to(dt);
    auto leaf = [](const at::Tensor& t) { return t.detach().clone().set_requires_grad(true); };
    at::Tensor xg = leaf(x.cuda()), shg = leaf(shift.cuda()), scg = leaf(scale.cuda());
    at::Tensor y = modulate(xg, shg, scg);  // CUDA: the fused function
    y.backward(dy.cuda());
    at::Tensor xc = leaf(x.to(at::kDouble)), shc = leaf(shift.to(at::kDouble)), scc = leaf(scale.to(at::kDouble));
    at::Tensor yc = modulate_fused(xc, shc, scc);
    yc.backward(dy.to(at::kDouble));
    EXPECT_LE(excess(y, yc, rtol, atol), 1.0) << dt_name(dt) << " y";
    EXPECT_LE(excess(xg.grad(), xc.grad(), rtol, atol), 1.0) << dt_name(dt) << " dx";
    EXPECT_LE(excess(shg.grad(), shc.grad(), rtol, atol), 1.0) << dt_name(dt) << " dshift";
    EXPECT_LE(excess(scg.grad(), scc.grad(), rtol, atol), 1.0) << dt_name(dt) << " dscale";
    // Against the unfused CUDA expression, which rounds LayerNorm's output and 1 + scale to T
    // too: those roundings are relative to |xhat * (1 + scale)|, not to |y| (shift may cancel),
    // hence the absolute part (2 ulps of the largest output).
    at::Tensor old = at::addcmul(shift.cuda(), at::layer_norm(x.cuda(), {H}, {}, {}, 1e-6), 1 + scale.cuda());
    EXPECT_LE(excess(y, old, 2 * rtol, 2 * rtol), 1.0) << dt_name(dt) << " vs unfused";
    // Frozen shift/scale: no gradient for them, same dx.
    at::Tensor x2 = leaf(x.cuda()), sh2 = shift.cuda(), sc2 = scale.cuda();
    modulate(x2, sh2, sc2).backward(dy.cuda());
    EXPECT_TRUE(at::equal(x2.grad(), xg.grad())) << dt_name(dt);
  }
#endif
}

// QK prologue, CUDA vs references. Tolerances:
//   q, k vs float64: |got - want| <= tol * |pair of want| with tol 1.6e-2 for bf16 (the path's
//   three bf16 roundings, at most ~3.9 half-ulps of the pair) and 1e-5 for f32;
//   q, k vs the CPU reference in the same dtype (the unfused path's numbers): >= 99.9% of the
//   elements bit-identical (a 1/rms that differs in its last float32 bit, ~20% of rows, flips a
//   bf16 rounding of x*r about once in 2^15 elements), all within 1.6e-2 bf16 / 2e-6 f32 of
//   the pair (a flipped rounding moves the pair by up to ~1.5 bf16 ulps);
//   v, and dv inside dqkv: exact copies;
//   dqkv vs float64: |got - want| <= rtol*|want| + atol*max|want|, rtol one ulp (bf16 8e-3, f32
//   1e-5), atol 8e-3 bf16 (the rounded dy) / 1e-5 f32; vs the CPU reference: >= 99% bit-identical.
TEST(FusedKernels, QkNormRopeCudaMatchesReference) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(13);
  struct Case {
    int64_t B, heads, D;
    std::vector<int64_t> lens;  // tokens per stream
    bool narrowed;              // qkv as a narrowed GEMM output (row stride > 3*heads*D)
  };
  const std::vector<Case> cases{{1, 24, 128, {1}, false},         {2, 24, 128, {7}, true},
                                {2, 24, 128, {512, 1024}, false}, {1, 24, 128, {1536}, true},
                                {1, 3, 10, {2, 3}, true},         {2, 2, 70, {5}, false},
                                {1, 24, 128, {512, 1024, 256}, true}, {2, 3, 10, {2, 3, 4}, false}};
  for (auto dt : {at::kBFloat16, at::kFloat}) {
    const bool bf = dt == at::kBFloat16;
    for (const Case& cs : cases) {
      std::string what = std::string(dt_name(dt)) + " B" + std::to_string(cs.B) + " h" + std::to_string(cs.heads) +
                         " D" + std::to_string(cs.D) + " L";
      int64_t L = 0;
      for (int64_t l : cs.lens) L += l, what += std::to_string(l) + "+";
      const int64_t W = 3 * cs.heads * cs.D;
      at::Tensor cos32, sin32;
      random_angles(L, cs.D, &cos32, &sin32);
      std::vector<kernels::QkvSegment> cpu, gpu, f64;
      for (int64_t l : cs.lens) {
        at::Tensor base = (at::randn({cs.B, l, W + (cs.narrowed ? 24 : 0)}) * 1.5).to(dt);
        at::Tensor qkv = base.narrow(2, 0, W);
        at::Tensor qs = (at::rand({cs.D}) + 0.5).to(dt), ks = (at::rand({cs.D}) + 0.5).to(dt);
        cpu.push_back({qkv, qs, ks});
        gpu.push_back({base.cuda().narrow(2, 0, W), qs.cuda(), ks.cuda()});
        f64.push_back({qkv.to(at::kDouble), qs.to(at::kDouble), ks.to(at::kDouble)});
      }
      at::Tensor cg = cos32.cuda(), sg = sin32.cuda(), c64 = cos32.to(at::kDouble), s64 = sin32.to(at::kDouble);
      ASSERT_TRUE(kernels::qk_norm_rope_cuda_supported(gpu, cs.heads, cg, sg)) << what;

      auto got = kernels::qk_norm_rope_forward_cuda(gpu, cs.heads, cg, sg);
      auto want = kernels::qk_norm_rope_forward_reference(f64, cs.heads, c64, s64);
      auto same = kernels::qk_norm_rope_forward_reference(cpu, cs.heads, cos32, sin32);
      for (int i = 0; i < 2; ++i) {
        const char* n = i == 0 ? " q" : " k";
        EXPECT_TRUE(got[i].transpose(1, 2).is_contiguous()) << "token-major memory";
        EXPECT_EQ(got[i].sizes(), (std::vector<int64_t>{cs.B, cs.heads, L, cs.D})) << what << n;
        const double e64 = pair_err(got[i], want[i]), e = pair_err(got[i], same[i]);
        const double eq = equal_fraction(got[i], same[i]);
        EXPECT_LE(e64, bf ? 1.6e-2 : 1e-5) << what << n;
        EXPECT_LE(e, bf ? 1.6e-2 : 2e-6) << what << n;
        if (bf) EXPECT_GE(eq, 0.999) << what << n;  // float32: summation order differs from ATen's (1 ulp), the f64 bound holds
        std::printf("[qk fwd] %s%s: vs f64 %.3g, vs same-dtype CPU %.3g, identical %.5f\n", what.c_str(), n, e64, e,
                    eq);
      }
      EXPECT_TRUE(at::equal(got[2].cpu(), same[2])) << what << " v";

      // Backward: dq as a transposed view, dk contiguous, dv contiguous.
      at::Tensor gq = at::randn({cs.B, L, cs.heads, cs.D}).to(dt).transpose(1, 2);
      at::Tensor gk = at::randn({cs.B, cs.heads, L, cs.D}).to(dt), gv = at::randn({cs.B, cs.heads, L, cs.D}).to(dt);
      std::vector<bool> need(cs.lens.size(), true);
      auto g = kernels::qk_norm_rope_backward_cuda(gq.cuda(), gk.cuda(), gv.cuda(), gpu, cs.heads, cg, sg, need);
      std::vector<kernels::QkvSegmentNeeds> needs(cs.lens.size());
      auto gw = kernels::qk_norm_rope_backward_reference(gq.to(at::kDouble), gk.to(at::kDouble), gv.to(at::kDouble),
                                                         f64, cs.heads, c64, s64, needs);
      auto gs = kernels::qk_norm_rope_backward_reference(gq, gk, gv, cpu, cs.heads, cos32, sin32, needs);
      int64_t off = 0;
      for (size_t i = 0; i < cs.lens.size(); ++i) {
        const std::string n = what + " dqkv" + std::to_string(i);
        ASSERT_TRUE(g[i].defined()) << n;
        EXPECT_EQ(g[i].sizes(), (std::vector<int64_t>{cs.B, cs.lens[i], W})) << n;
        EXPECT_LE(excess(g[i], gw[i].qkv, bf ? 8e-3 : 1e-5, bf ? 8e-3 : 1e-5), 1.0) << n;
        const double eq = equal_fraction(g[i], gs[i].qkv);
        if (bf) EXPECT_GE(eq, 0.99) << n;  // float32: see the forward
        std::printf("[qk bwd] %s: excess vs f64 %.3g, identical to same-dtype CPU %.5f\n", n.c_str(),
                    excess(g[i], gw[i].qkv, bf ? 8e-3 : 1e-5, bf ? 8e-3 : 1e-5), eq);
        at::Tensor dv_part = g[i].cpu().view({cs.B, cs.lens[i], 3, cs.heads, cs.D}).select(2, 2);
        EXPECT_TRUE(at::equal(dv_part, gv.narrow(2, off, cs.lens[i]).transpose(1, 2))) << n << " dv";
        off += cs.lens[i];
      }
      // Undefined dq and dv: zeros there; only the second stream's (or the only) dqkv.
      std::vector<bool> need_last(cs.lens.size(), false);
      need_last.back() = true;
      auto g2 = kernels::qk_norm_rope_backward_cuda(at::Tensor(), gk.cuda(), at::Tensor(), gpu, cs.heads, cg, sg,
                                                    need_last);
      EXPECT_TRUE(cs.lens.size() == 1 || !g2[0].defined()) << what;
      at::Tensor g2v = g2.back().cpu().view({cs.B, cs.lens.back(), 3, cs.heads, cs.D});
      at::Tensor g1v = g.back().cpu().view({cs.B, cs.lens.back(), 3, cs.heads, cs.D});
      EXPECT_EQ(g2v.select(2, 0).abs().max().item<double>(), 0.0) << what;
      EXPECT_EQ(g2v.select(2, 2).abs().max().item<double>(), 0.0) << what;
      EXPECT_TRUE(at::equal(g2v.select(2, 1), g1v.select(2, 1))) << what;

      // Gradient pieces (qk_norm_rope_split's): q as main + last-stream pieces, k and v as a
      // piece over all tokens plus one over the last stream. Equal, bit for bit, to the whole
      // gradients formed in the dtype (autograd's sum of the two, rounded once).
      if (cs.lens.size() >= 2) {
        const int64_t split = L - cs.lens.back(), Lc = cs.lens.back();
        at::Tensor gq2 = at::randn({cs.B, cs.heads, Lc, cs.D}).to(dt);
        at::Tensor gk2 = at::randn({cs.B, cs.heads, Lc, cs.D}).to(dt).transpose(1, 2).contiguous().transpose(1, 2);
        at::Tensor gv2 = at::randn({cs.B, cs.heads, Lc, cs.D}).to(dt);
        at::Tensor wq = at::cat({gq.narrow(2, 0, split), gq2}, 2);
        at::Tensor wk = gk.clone(), wv = gv.clone();
        wk.narrow(2, split, Lc).add_(gk2);
        wv.narrow(2, split, Lc).add_(gv2);
        auto whole = kernels::qk_norm_rope_backward_cuda(wq.cuda(), wk.cuda(), wv.cuda(), gpu, cs.heads, cg, sg, need);
        auto pieces = kernels::qk_norm_rope_backward_cuda(
            {gq.cuda().narrow(2, 0, split), 0, gq2.cuda(), split}, {gk.cuda(), 0, gk2.cuda(), split},
            {gv.cuda(), 0, gv2.cuda(), split}, gpu, cs.heads, cg, sg, need);
        auto ref = kernels::qk_norm_rope_backward_reference({gq.narrow(2, 0, split), 0, gq2, split}, {gk, 0, gk2, split},
                                                            {gv, 0, gv2, split}, cpu, cs.heads, cos32, sin32, needs);
        auto ref_whole = kernels::qk_norm_rope_backward_reference(wq, wk, wv, cpu, cs.heads, cos32, sin32, needs);
        for (size_t i = 0; i < cs.lens.size(); ++i) {
          EXPECT_TRUE(at::equal(pieces[i], whole[i])) << what << " pieces dqkv" << i;
          EXPECT_TRUE(at::equal(ref[i].qkv, ref_whole[i].qkv)) << what << " reference pieces dqkv" << i;
        }
      }
    }
  }
#endif
}

// The autograd function on CUDA against CPU float64 (scales requiring grad, q unused in one
// case), tolerances as above; scale gradients (sums over B*L*heads rows): rel_err 1e-2 bf16, 1e-5 f32.
TEST(FusedKernels, QkNormRopeAutogradCudaMatchesCpu) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(14);
  for (auto dt : {at::kBFloat16, at::kFloat}) {
    const bool bf = dt == at::kBFloat16;
    for (bool use_q : {true, false}) {
      const int64_t B = 2, heads = 24, D = 128, Lt = 5, Li = 11, W = 3 * heads * D;
      at::Tensor cos32, sin32;
      random_angles(Lt + Li, D, &cos32, &sin32);
      at::Tensor t = at::randn({B, Lt, W}).to(dt), im = at::randn({B, Li, W}).to(dt);
      std::vector<at::Tensor> sc;
      for (int i = 0; i < 4; ++i) sc.push_back((at::rand({D}) + 0.5).to(dt));
      at::Tensor gq = at::randn({B, heads, Lt + Li, D}).to(dt), gk = at::randn_like(gq), gv = at::randn_like(gq);
      auto run = [&](c10::Device dev, at::ScalarType st) {
        auto leaf = [&](const at::Tensor& x) { return x.to(dev).to(st).detach().set_requires_grad(true); };
        std::vector<at::Tensor> p{leaf(t), leaf(sc[0]), leaf(sc[1]), leaf(im), leaf(sc[2]), leaf(sc[3])};
        Rope r{cos32.to(dev).to(st == at::kDouble ? at::kDouble : at::kFloat),
               sin32.to(dev).to(st == at::kDouble ? at::kDouble : at::kFloat)};
        auto o = qk_norm_rope({{p[0], p[1], p[2]}, {p[3], p[4], p[5]}}, heads, r);
        if (use_q)
          torch::autograd::backward({o[0], o[1], o[2]}, {gq.to(dev).to(st), gk.to(dev).to(st), gv.to(dev).to(st)});
        else
          torch::autograd::backward({o[1], o[2]}, {gk.to(dev).to(st), gv.to(dev).to(st)});
        std::vector<at::Tensor> res{o[0], o[1], o[2]};
        for (auto& x : p) res.push_back(x.grad());
        return res;
      };
      auto a = run(c10::Device(c10::kCUDA), dt);
      auto b = run(c10::Device(c10::kCPU), at::kDouble);
      const std::string what = std::string(dt_name(dt)) + (use_q ? " with q" : " without q");
      EXPECT_LE(pair_err(a[0], b[0]), bf ? 1.6e-2 : 1e-5) << what << " q";
      EXPECT_LE(pair_err(a[1], b[1]), bf ? 1.6e-2 : 1e-5) << what << " k";
      EXPECT_TRUE(at::equal(a[2].cpu().to(at::kDouble), b[2])) << what << " v";
      EXPECT_LE(excess(a[3], b[3], bf ? 8e-3 : 1e-5, bf ? 8e-3 : 1e-5), 1.0) << what << " dqkv txt";
      EXPECT_LE(excess(a[6], b[6], bf ? 8e-3 : 1e-5, bf ? 8e-3 : 1e-5), 1.0) << what << " dqkv img";
      for (int i : {4, 5, 7, 8}) {
        ASSERT_TRUE(a[i].defined()) << what << " scale " << i;
        EXPECT_LT(rel_err(a[i].cpu(), b[i]), bf ? 1e-2 : 1e-5) << what << " scale " << i;
      }
    }
  }
#endif
}

// The blocks on CUDA (fused modulate and prologue, float32) against the same blocks on CPU
// (unfused), with a condition stream and the last single block (its condition queries unused):
// outputs and input gradients to 1e-4 (float32 GEMMs and attention on two devices).
TEST(FusedKernels, BlocksOnCudaMatchCpu) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const TensorMap w = init_random_weights(cfg, 21, at::kFloat);
  at::manual_seed(22);
  const int64_t B = 2, T = 4, L = 9, Lc = 6, H = cfg.hidden_size;
  at::Tensor img = at::randn({B, L, H}), txt = at::randn({B, T, H}), cond = at::randn({B, Lc, H});
  at::Tensor vec = at::randn({B, H}), vec_cond = at::randn({B, H});
  at::Tensor main_ids = at::rand({T + L, 3}, kF64) * 20, cond_ids = at::rand({Lc, 3}, kF64) * 20;
  auto blocks = [&](c10::Device dev) {
    TensorMap wd, ws;
    for (const auto& kv : w) {
      if (kv.first.rfind("double_blocks.0.", 0) == 0) wd.emplace(kv.first.substr(16), kv.second.to(dev));
      if (kv.first.rfind("single_blocks.0.", 0) == 0) ws.emplace(kv.first.substr(16), kv.second.to(dev));
    }
    BlockContext ctx;
    ctx.cfg = &cfg;
    ctx.cond_lens = {Lc};
    ctx.rope_main = rope_from_ids(main_ids, cfg.axes_dim, cfg.theta, at::kFloat);
    ctx.rope_cond = rope_from_ids(cond_ids, cfg.axes_dim, cfg.theta, at::kFloat);
    ctx.rope_main = {ctx.rope_main.cos.to(dev), ctx.rope_main.sin.to(dev)};
    ctx.rope_cond = {ctx.rope_cond.cos.to(dev), ctx.rope_cond.sin.to(dev)};
    auto leaf = [&](const at::Tensor& x) { return x.to(dev).detach().set_requires_grad(true); };
    at::Tensor i = leaf(img), t = leaf(txt), c = leaf(cond), v = leaf(vec), vc = leaf(vec_cond);
    auto d = double_block(ctx, wd, i, t, c, v, vc);
    ctx.block = static_cast<int>(cfg.depth);
    ctx.last_block = true;
    auto s = single_block(ctx, ws, at::cat({d[1], d[0]}, 1), d[2], v, vc);
    at::Tensor loss = (s[0] * s[0]).sum() + (d[2] * d[2]).sum();
    loss.backward();
    return std::vector<at::Tensor>{d[0], d[1], d[2], s[0], i.grad(), t.grad(), c.grad(), v.grad(), vc.grad()};
  };
  auto a = blocks(c10::Device(c10::kCUDA));
  auto b = blocks(c10::Device(c10::kCPU));
  const char* names[] = {"img", "txt", "cond", "x", "d img", "d txt", "d cond", "d vec", "d vec_cond"};
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(a[i].defined() && b[i].defined()) << names[i];
    EXPECT_LT(rel_err(a[i].cpu(), b[i]), 1e-4) << names[i];
  }
#endif
}
