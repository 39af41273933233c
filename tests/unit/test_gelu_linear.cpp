// The linear after FLUX's tanh-GELU as one node (model/gelu_linear.h) and its input gradient in
// one GEMM (kernels/matmul_dgelu.h):
//  - the reference product against GELU's derivative taken by central finite differences of
//    GELU's own definition, x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in float64;
//  - gelu_linear's forward and gradients against autograd through the unfused expression
//    (cat, GELU, linear) in float64, with and without a second input, and with compute_output off;
//  - with input-side LoRA adapters, against peft's formula y = W x + b + s B A x written out on
//    the concatenated input with autograd (float64, float32 masters too);
//  - on CUDA, cuBLASLt's DGELU epilogue against the float64 formula, and that its derivative is
//    the tanh form's and not the erf form's.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "kernels/matmul_dgelu.h"
#include "model/gelu_linear.h"
#include "model/recompute.h"
#include "support/test_util.h"

using namespace fluxtrain;

namespace {

// GELU (tanh form) from its definition, float64.
at::Tensor gelu_tanh_def(const at::Tensor& x) {
  const double k = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + at::tanh(k * (x + 0.044715 * x * x * x)));
}

// Its derivative by central differences (float64, step 1e-5: error ~1e-10 here).
at::Tensor gelu_tanh_fd(const at::Tensor& x) {
  const double h = 1e-5;
  return (gelu_tanh_def(x + h) - gelu_tanh_def(x - h)) / (2 * h);
}

// The erf form's derivative, Phi(x) + x phi(x): what the tanh form must not be mistaken for.
at::Tensor gelu_erf_deriv(const at::Tensor& x) {
  return 0.5 * (1.0 + at::erf(x / std::sqrt(2.0))) + x * at::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
}

}  // namespace

// Tolerance: 1e-8 of the largest magnitude (finite-difference error ~1e-10).
TEST(MatmulDgelu, ReferenceMatchesFiniteDifferencesOfGelusDefinition) {
  at::manual_seed(3);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor dy = at::randn({7, 5}, f64), w = at::randn({5, 11}, f64), pre = at::randn({7, 11}, f64) * 3;
  at::Tensor want = at::mm(dy, w) * gelu_tanh_fd(pre);
  EXPECT_LT(rel_err(kernels::matmul_dgelu_reference(dy, w, pre), want), 1e-8);
  EXPECT_LT(rel_err(kernels::matmul_dgelu(dy, w, pre), want), 1e-8);  // the CPU dispatch
}

// float64: forward 1e-12, gradients 1e-12 (both sides are the same formulas in float64).
TEST(GeluLinear, MatchesAutogradThroughTheUnfusedOps) {
  at::manual_seed(5);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 2, L = 3, H = 4, M = 6, O = 5;
  for (bool with_attn : {false, true}) {
    const int64_t in = (with_attn ? H : 0) + M;
    at::Tensor attn = at::randn({B, L, H}, f64).set_requires_grad(true);
    at::Tensor pre = (at::randn({B, L, M}, f64) * 2).set_requires_grad(true);
    at::Tensor w = at::randn({O, in}, f64), b = at::randn({O}, f64), gy = at::randn({B, L, O}, f64);
    std::vector<at::Tensor> xs;
    if (with_attn) xs.push_back(attn);
    at::Tensor act = at::gelu(pre, "tanh");
    at::Tensor want = at::linear(with_attn ? at::cat({attn, act}, -1) : act, w, b);
    std::vector<at::Tensor> ins = xs;
    ins.push_back(pre);
    auto gw = torch::autograd::grad({want}, ins, {gy});
    at::Tensor got = gelu_linear(xs, pre, w, b, true);
    EXPECT_LT(rel_err(got, want), 1e-12) << with_attn;
    auto gg = torch::autograd::grad({got}, ins, {gy});
    for (size_t i = 0; i < ins.size(); ++i) EXPECT_LT(rel_err(gg[i], gw[i]), 1e-12) << with_attn << " input " << i;
    // Output left uncomputed: the same gradients, counted as a skipped linear.
    const int64_t skipped = recompute_stats().linears_skipped;
    at::Tensor empty = gelu_linear(xs, pre, w, b, false);
    EXPECT_EQ(empty.sizes(), want.sizes());
    EXPECT_EQ(recompute_stats().linears_skipped, skipped + 1);
    auto ge = torch::autograd::grad({empty}, ins, {gy});
    for (size_t i = 0; i < ins.size(); ++i) EXPECT_LT(rel_err(ge[i], gw[i]), 1e-12) << with_attn << " input " << i;
  }
}

// Adapters on all rows (standard mode's proj_out / ff.net.2): peft's LoRA formula on the unfused
// input, y = cat(xs, GELU(pre)) W^T + b, then y[:, off_i : off_i + n_i] += s_i (x A_i^T) B_i^T,
// through autograd. Two adapters (one on every output column, one on a column range), with and
// without a second input. float64 masters: forward and every gradient 1e-12 (the same formulas,
// float64 on both sides). float32 masters: their gradients come back in float32 (1e-6).
TEST(GeluLinear, AdaptersMatchPeftsFormulaThroughTheUnfusedOps) {
  at::manual_seed(15);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 2, L = 3, H = 4, M = 6, O = 5;
  for (bool with_attn : {false, true}) {
    for (auto master : {at::kDouble, at::kFloat}) {
      const std::string what = std::string(with_attn ? "attn+" : "") + c10::toString(master);
      const int64_t in = (with_attn ? H : 0) + M;
      at::Tensor attn = at::randn({B, L, H}, f64).set_requires_grad(true);
      at::Tensor pre = (at::randn({B, L, M}, f64) * 2).set_requires_grad(true);
      at::Tensor w = at::randn({O, in}, f64), b = at::randn({O}, f64), gy = at::randn({B, L, O}, f64);
      InputAdapters a;
      a.downs = {(at::randn({2, in}, f64) * 0.5).to(master).set_requires_grad(true),
                 (at::randn({3, in}, f64) * 0.5).to(master).set_requires_grad(true)};
      a.ups = {(at::randn({O, 2}, f64) * 0.5).to(master).set_requires_grad(true),
               (at::randn({2, 3}, f64) * 0.5).to(master).set_requires_grad(true)};
      a.offsets = {0, 2};
      a.scales = {0.75, 2.0};
      std::vector<at::Tensor> xs;
      if (with_attn) xs.push_back(attn);
      // peft's formula on the concatenated input.
      at::Tensor x = with_attn ? at::cat({attn, at::gelu(pre, "tanh")}, -1) : at::gelu(pre, "tanh");
      at::Tensor base = at::linear(x, w, b);
      at::Tensor d0 = at::matmul(at::matmul(x, a.downs[0].to(at::kDouble).t()), a.ups[0].to(at::kDouble).t()) * 0.75;
      at::Tensor d1 = at::matmul(at::matmul(x, a.downs[1].to(at::kDouble).t()), a.ups[1].to(at::kDouble).t()) * 2.0;
      at::Tensor want = base + d0 + at::constant_pad_nd(d1, {2, O - 4});
      std::vector<at::Tensor> ins = xs;
      ins.push_back(pre);
      ins.insert(ins.end(), a.downs.begin(), a.downs.end());
      ins.insert(ins.end(), a.ups.begin(), a.ups.end());
      auto gw = torch::autograd::grad({want}, ins, {gy});
      at::Tensor got = gelu_linear(xs, pre, w, b, true, {}, a);
      EXPECT_LT(rel_err(got, want), 1e-12) << what;
      auto gg = torch::autograd::grad({got}, ins, {gy});
      const double tol = master == at::kDouble ? 1e-12 : 1e-6;
      for (size_t i = 0; i < ins.size(); ++i) {
        EXPECT_EQ(gg[i].scalar_type(), ins[i].scalar_type()) << what << " input " << i;
        EXPECT_LT(rel_err(gg[i].to(at::kDouble), gw[i].to(at::kDouble)), tol) << what << " input " << i;
      }
    }
  }
}

// The same on CUDA in bf16, float32 masters, at a size whose GEMMs take the cuBLASLt path (multiples of 8), against the float64
// formula on the same rounded operands: 2e-2 of the largest magnitude (twice the DGELU epilogue
// test's bf16 bound: the adapters' h and dh are rounded to bf16 as well; measured on the H200:
// 5.4e-3 at most). Measured errors are printed.
TEST(GeluLinear, CudaAdaptersMatchFloat64) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(16);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t R = 96, H = 64, M = 256, O = 64, r = 16;
  at::Tensor attn = at::randn({1, R, H}, f64).to(at::kBFloat16), pre = (at::randn({1, R, M}, f64) * 2).to(at::kBFloat16);
  at::Tensor w = (at::randn({O, H + M}, f64) / 16).to(at::kBFloat16), b = at::randn({O}, f64).to(at::kBFloat16);
  at::Tensor gy = at::randn({1, R, O}, f64).to(at::kBFloat16);
  at::Tensor down = (at::randn({r, H + M}, f64) / 16).to(at::kFloat), up = (at::randn({O, r}, f64) / 4).to(at::kFloat);
  // float64 reference through autograd on the rounded operands.
  auto leaf = [](const at::Tensor& t) { return t.to(at::kDouble).set_requires_grad(true); };
  at::Tensor a64 = leaf(attn), p64 = leaf(pre), d64 = leaf(down), u64 = leaf(up);
  at::Tensor x = at::cat({a64, at::gelu(p64, "tanh")}, -1);
  at::Tensor want = at::linear(x, w.to(at::kDouble), b.to(at::kDouble)) +
                    1.5 * at::matmul(at::matmul(x, d64.t()), u64.t());
  auto gw = torch::autograd::grad({want}, {a64, p64, d64, u64}, {gy.to(at::kDouble)});
  auto cuda_leaf = [](const at::Tensor& t) { return t.cuda().set_requires_grad(true); };
  at::Tensor ac = cuda_leaf(attn), pc = cuda_leaf(pre), dc = cuda_leaf(down), uc = cuda_leaf(up);
  InputAdapters ad;
  ad.downs = {dc};
  ad.ups = {uc};
  ad.offsets = {0};
  ad.scales = {1.5};
  at::Tensor got = gelu_linear({ac}, pc, w.cuda(), b.cuda(), true, {}, ad);
  auto gg = torch::autograd::grad({got}, {ac, pc, dc, uc}, {gy.cuda()});
  EXPECT_LT(rel_err(got.cpu().to(at::kDouble), want), 2e-2);
  const char* names[] = {"attn", "pre", "down", "up"};
  for (int i = 0; i < 4; ++i) {
    const double e = rel_err(gg[i].cpu().to(at::kDouble), gw[i]);
    EXPECT_LT(e, 2e-2) << names[i];
    std::printf("[gelu_linear adapters] d%s: %.3g of the largest magnitude\n", names[i], e);
  }
#endif
}

// cuBLASLt's DGELU epilogue (GPU only). Tolerances against the float64 formula on the same
// operands, relative to the largest magnitude: float32 3e-5 (cuBLASLt evaluates the derivative
// with an approximate tanh: 1.3e-5 measured on the H200); bf16/fp16 1e-2 (one rounding of the
// output, plus the products accumulated in float32; measured 3.9e-3 / 4.2e-4). The form: with
// w = I (an exact product), float32, the result is within 3e-5 of the tanh form's derivative,
// while the erf form differs from it by more than 3e-4 on these inputs (measured 1.2e-5 and 8.4e-4).
TEST(MatmulDgelu, CudaEpilogueMatchesFloat64) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(7);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  struct Case {
    int64_t M, O, N;
    bool strided;  // w a column slice of a wider weight, pre a column slice of a wider activation
  };
  for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const double tol = dt == at::kFloat ? 3e-5 : 1e-2;
    for (Case cs : {Case{64, 48, 96, false}, Case{1024, 3072, 512, true}, Case{8, 16, 8, false}}) {
      const std::string what = std::string(c10::toString(dt)) + " M" + std::to_string(cs.M);
      at::Tensor wide_w = at::randn({cs.O, cs.N + (cs.strided ? 64 : 0)}, f64) / std::sqrt(double(cs.O));
      at::Tensor wide_p = at::randn({cs.M, cs.N + (cs.strided ? 32 : 0)}, f64) * 2;
      at::Tensor dy = at::randn({cs.M, cs.O}, f64).to(dt);
      at::Tensor w = wide_w.to(dt).narrow(1, cs.strided ? 64 : 0, cs.N);
      at::Tensor pre = wide_p.to(dt).narrow(1, cs.strided ? 32 : 0, cs.N);
      at::Tensor dyc = dy.cuda(), wc = wide_w.to(dt).cuda().narrow(1, cs.strided ? 64 : 0, cs.N),
                 pc = wide_p.to(dt).cuda().narrow(1, cs.strided ? 32 : 0, cs.N);
      ASSERT_TRUE(kernels::matmul_dgelu_cuda_supported(dyc, wc, pc)) << what;
      at::Tensor got = kernels::matmul_dgelu_cuda(dyc, wc, pc);
      ASSERT_TRUE(got.defined()) << what << ": cuBLASLt declined the DGELU epilogue";
      at::Tensor pd = pre.to(at::kDouble);
      at::Tensor want = at::mm(dy.to(at::kDouble), w.to(at::kDouble)) * gelu_tanh_fd(pd);
      const double e = rel_err(got.cpu(), want);
      EXPECT_LE(e, tol) << what;
      std::printf("[dgelu] %s: max error %.3g of the largest magnitude\n", what.c_str(), e);
    }
  }
  // The derivative's form, float32, exact product (w = I).
  at::Tensor pre = at::linspace(-4, 4, 64 * 64, f64).view({64, 64});
  at::Tensor dy = at::randn({64, 64}, f64) + 2;
  at::Tensor got = kernels::matmul_dgelu_cuda(dy.to(at::kFloat).cuda(), at::eye(64, at::kFloat).cuda(),
                                              pre.to(at::kFloat).cuda());
  ASSERT_TRUE(got.defined());
  const double e_tanh = rel_err(got.cpu(), dy * gelu_tanh_fd(pre)), e_erf = rel_err(got.cpu(), dy * gelu_erf_deriv(pre));
  std::printf("[dgelu] form: vs tanh %.3g, vs erf %.3g\n", e_tanh, e_erf);
  EXPECT_LE(e_tanh, 3e-5);
  EXPECT_GT(e_erf, 3e-4);
#endif
}
