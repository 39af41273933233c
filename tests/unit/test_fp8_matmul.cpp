// --fp8_matmul (kernels/fp8_matmul.h): the rowwise activation quantiser against its formula
// recomputed in float64 (exact), fp8_linear's forward and input gradient against float64 products
// of the same quantised operands, the CUDA _scaled_mm path against the reference path (GPU only),
// and a tiny model run through the fp8 provider with and without --fp8_matmul.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <string>

#include <boost/program_options.hpp>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "core/error.h"
#include "dist/fp8_weights.h"
#include "dist/low_memory_weights.h"
#include "dist/offloaded_weights.h"
#include "kernels/fp8.h"
#include "kernels/fp8_matmul.h"
#include "model/gelu_linear.h"
#include "model/lora_linear.h"
#include "support/provider_check.h"

using namespace fluxtrain;
using namespace fluxtrain::provider_check;
using kernels::Fp8Path;

namespace {

double max_rel(const at::Tensor& got, const at::Tensor& want) {
  at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  return (g - w).abs().max().item<double>() / std::max(w.abs().max().item<double>(), 1e-300);
}

// Rows of very different magnitudes, an all-zero row and a row of subnormal-sized values.
at::Tensor test_rows(int64_t m, int64_t k, at::ScalarType dt, uint64_t seed) {
  at::manual_seed(seed);
  at::Tensor x = at::randn({m, k}, at::kDouble) * at::pow(10.0, at::linspace(-3, 3, m, at::kDouble)).unsqueeze(1);
  x[1].zero_();
  x[2].mul_(1e-39);
  return x.to(dt);
}

// The formula of fp8_quantise_rows in float64: s = max(f32(amax / 448), FLT_MIN), r = f32(1 / s),
// codes = e4m3(f32(x * r)). (A float32 quotient is the float64 one rounded to float32 exactly:
// 53 >= 2 * 24 + 2, so the float64 route has no double-rounding difference; the product of two
// float32 values is exact in float64.)
// On a CUDA x the quantiser is the one-pass kernel; the formula is still evaluated on the CPU
// (a GPU division by a scalar multiplies by its reciprocal).
void expect_formula(const at::Tensor& x, const at::Tensor& col) {
  kernels::Fp8Rows q = kernels::fp8_quantise_rows(x, col);
  q = {q.data.cpu(), q.scale.cpu()};
  at::Tensor xd = x.cpu().to(at::kDouble);
  if (col.defined()) xd = (xd * col.cpu().to(at::kDouble).reshape({1, -1})).to(at::kFloat).to(at::kDouble);
  const at::Tensor amax = xd.abs().amax(1, true);
  const at::Tensor s = (amax / 448.0).to(at::kFloat).clamp_min(FLT_MIN);
  const at::Tensor r = (1.0 / s.to(at::kDouble)).to(at::kFloat);
  const at::Tensor codes = (xd * r.to(at::kDouble)).to(at::kFloat).to(at::kFloat8_e4m3fn);
  EXPECT_EQ(q.scale.scalar_type(), at::kFloat);
  EXPECT_EQ(q.data.scalar_type(), at::kFloat8_e4m3fn);
  EXPECT_EQ(q.scale.sizes(), (std::vector<int64_t>{x.size(0), 1}));
  EXPECT_TRUE(at::equal(q.scale, s)) << "scales";
  EXPECT_TRUE(at::equal(q.data.to(at::kDouble), codes.to(at::kDouble))) << "codes";
  EXPECT_EQ(q.data.to(at::kDouble).abs().max().item<double>(), 448.0);  // the largest value of a row maps to 448
  EXPECT_FALSE(at::isnan(q.data.to(at::kFloat)).any().item<bool>());
}

// validate() refuses o with an error naming each of `names` (the flags involved).
void expect_refused(const dist::LowMemoryOptions& o, std::initializer_list<const char*> names) {
  try {
    o.validate();
    ADD_FAILURE() << "accepted, expected an error naming " << *names.begin();
  } catch (const Error& e) {
    for (const char* n : names) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Fp8Matmul, QuantiseRowsMatchesFormulaExactly) {
  expect_formula(test_rows(9, 64, at::kFloat, 1), at::Tensor());
  expect_formula(test_rows(9, 64, at::kBFloat16, 2), at::Tensor());
  // With a column scale folded in first (the input gradient's per-channel weight scales).
  expect_formula(test_rows(9, 64, at::kBFloat16, 3), at::rand({64}, at::kFloat) + 1e-3);
  const kernels::Fp8Rows z = kernels::fp8_quantise_rows(at::zeros({2, 16}, at::kFloat));
  EXPECT_TRUE(at::equal(z.scale, at::full({2, 1}, FLT_MIN, at::kFloat)));
  EXPECT_EQ(z.data.to(at::kFloat).abs().max().item<float>(), 0.0f);
}

namespace {

// The one-pass CUDA kernels (kernels/fp8_operands.cu) against the same formula, exactly: bf16,
// f16 and float32 rows, with and without column scales ([K] and [1]), rows of a length that is
// no multiple of the 16-byte vector, rows of a wider matrix (row stride > K); and the code
// transposition against ATen's, bit for bit, on tile edges and on a column-narrowed view.
TEST(Fp8Matmul, CudaOperandKernelsMatchFormulaExactly) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const auto cuda = [](const at::Tensor& t) { return t.to(at::kCUDA); };
  for (auto dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
    expect_formula(cuda(test_rows(9, 3072, dt, 21)), at::Tensor());
    expect_formula(cuda(test_rows(9, 200, dt, 22)), cuda(at::rand({200}, at::kFloat) + 1e-3));
    expect_formula(cuda(test_rows(7, 37, dt, 23)), at::Tensor());  // no 16-byte vectors
    expect_formula(cuda(test_rows(7, 48, dt, 24)), cuda(at::full({1}, 0.37f)));
    expect_formula(cuda(test_rows(5, 96, dt, 25)).narrow(1, 16, 64), at::Tensor());  // row stride 96
  }
  at::manual_seed(26);
  const at::Tensor w8 = (at::randn({200, 328}, at::kCUDA) * 50).to(at::kFloat8_e4m3fn);
  const auto same = [](const at::Tensor& a, const at::Tensor& b) {
    return a.sizes() == b.sizes() && a.is_contiguous() &&
           at::equal(a.view(at::kByte).cpu(), b.contiguous().view(at::kByte).cpu());
  };
  EXPECT_TRUE(same(kernels::fp8_transpose_codes(w8), w8.t()));
  EXPECT_TRUE(same(kernels::fp8_transpose_codes(w8.narrow(1, 64, 200)), w8.narrow(1, 64, 200).t()));
  EXPECT_TRUE(same(kernels::fp8_transpose_codes(w8.narrow(0, 0, 6).narrow(1, 0, 7)), w8.narrow(0, 0, 6).narrow(1, 0, 7).t()));
#endif
}

// fp8_linear (CPU: the reference path) against float64 products of the operands it quantised:
// y = (x8 s_x)(w8 s_w)^T + b and dx = (g8 s_g) w8 with g = dy s_w. Tolerance 1e-5 of the
// largest magnitude: float32 accumulation over 48 terms of exactly representable products.
void check_reference_linear(kernels::Fp8Scaling scaling) {
  at::manual_seed(5);
  const int64_t in = 48, out = 40;
  const at::Tensor w = at::randn({out, in}, at::kFloat) * at::rand({out, 1}, at::kFloat);
  const kernels::Fp8Tensor wq = kernels::fp8_quantise(w, scaling);
  const at::Tensor b = at::randn({out}, at::kFloat).requires_grad_();
  const at::Tensor x = at::randn({2, 7, in}, at::kFloat).requires_grad_();
  const at::Tensor y = kernels::fp8_linear(x, wq.data, wq.scale, b);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 7, out}));
  const at::Tensor dy = at::randn(y.sizes(), at::kFloat);
  y.backward(dy);

  const at::Tensor sw = (wq.scale.numel() == 1 ? wq.scale.expand({out}) : wq.scale).to(at::kDouble);
  const at::Tensor wd = wq.data.to(at::kDouble) * sw.unsqueeze(1);
  const kernels::Fp8Rows xq = kernels::fp8_quantise_rows(x.detach().reshape({-1, in}));
  const at::Tensor y_ref = at::mm(xq.data.to(at::kDouble) * xq.scale.to(at::kDouble), wd.t()) + b.detach().to(at::kDouble);
  EXPECT_LT(max_rel(y.detach().reshape({-1, out}), y_ref), 1e-5);
  const kernels::Fp8Rows gq = kernels::fp8_quantise_rows(dy.reshape({-1, out}), sw.to(at::kFloat));
  const at::Tensor dx_ref = at::mm(gq.data.to(at::kDouble) * gq.scale.to(at::kDouble), wq.data.to(at::kDouble));
  EXPECT_LT(max_rel(x.grad().reshape({-1, in}), dx_ref), 1e-5);
  EXPECT_LT(max_rel(b.grad(), dy.sum(std::vector<int64_t>{0, 1})), 1e-6);
  // And the quantisation error itself against the exact product with the stored weight.
  const at::Tensor y_exact = at::mm(x.detach().reshape({-1, in}).to(at::kDouble), wd.t()) + b.detach().to(at::kDouble);
  const double err = max_rel(y.detach().reshape({-1, out}), y_exact);
  EXPECT_GT(err, 0.0);
  EXPECT_LT(err, 0.1);
}

}  // namespace

TEST(Fp8Matmul, ReferenceForwardAndInputGradMatchFloat64PerChannel) {
  check_reference_linear(kernels::Fp8Scaling::PerChannel);
}
TEST(Fp8Matmul, ReferenceForwardAndInputGradMatchFloat64PerTensor) {
  check_reference_linear(kernels::Fp8Scaling::PerTensor);
}

// lora_linear's hand-written node with an e4m3 base weight against fp8_linear plus the adapters
// written with plain ops and differentiated by autograd (float32, 1e-5 of the largest magnitude).
TEST(Fp8Matmul, LoraLinearWithFp8BaseMatchesComposition) {
  at::manual_seed(13);
  const int64_t in = 32, out = 24;
  const kernels::Fp8Tensor wq = kernels::fp8_quantise(at::randn({out, in}), kernels::Fp8Scaling::PerChannel);
  const at::Tensor b = at::randn({out});
  const at::Tensor x0 = at::randn({3, 5, in}), dy = at::randn({3, 5, out});
  const at::Tensor d0 = at::randn({4, in}) * 0.3, u0 = at::randn({10, 4}) * 0.3;
  // Got: one node. Want: the fp8 base product, then the adapter's rows 6..16 added.
  at::Tensor x = x0.clone().requires_grad_(), d = d0.clone().requires_grad_(), u = u0.clone().requires_grad_();
  const at::Tensor y = lora_linear(x, wq.data, b, {d}, {u}, {6}, {0.5}, wq.scale);
  y.backward(dy);
  at::Tensor xr = x0.clone().requires_grad_(), dr = d0.clone().requires_grad_(), ur = u0.clone().requires_grad_();
  at::Tensor base = kernels::fp8_linear(xr, wq.data, wq.scale, b);
  const at::Tensor delta = at::matmul(at::matmul(xr, dr.t()), ur.t()) * 0.5;
  const at::Tensor yr = at::cat({base.narrow(2, 0, 6), base.narrow(2, 6, 10) + delta, base.narrow(2, 16, 8)}, 2);
  yr.backward(dy);
  EXPECT_LT(max_rel(y.detach(), yr.detach()), 1e-5);
  EXPECT_LT(max_rel(x.grad(), xr.grad()), 1e-5);
  EXPECT_LT(max_rel(d.grad(), dr.grad()), 1e-5);
  EXPECT_LT(max_rel(u.grad(), ur.grad()), 1e-5);
}

namespace {

// gelu_linear with an e4m3 weight (one node: the concatenation quantised as one matrix, one fp8
// product each way) against its composition with plain ops differentiated by autograd:
// fp8_linear(cat(attn, gelu_tanh(pre))). Same quantised operands and products, so the same
// values up to the float32 accumulation order (1e-6 of the largest magnitude; on the CPU both
// take the reference path, on CUDA both _scaled_mm).
void check_gelu_linear_fp8(const at::TensorOptions& o, double tol) {
  at::manual_seed(31);
  const int64_t h = 32, m = 96, out = 48;
  const kernels::Fp8Tensor wq = kernels::fp8_quantise(at::randn({out, h + m}, o.dtype(at::kFloat)),
                                                      kernels::Fp8Scaling::PerChannel);
  const at::Tensor b = at::randn({out}, o);
  const at::Tensor a0 = at::randn({2, 24, h}, o), p0 = at::randn({2, 24, m}, o), dy = at::randn({2, 24, out}, o);
  at::Tensor a = a0.clone().requires_grad_(), p = p0.clone().requires_grad_();
  const at::Tensor y = gelu_linear({a}, p, wq.data, b, true, wq.scale);
  y.backward(dy);
  at::Tensor ar = a0.clone().requires_grad_(), pr = p0.clone().requires_grad_();
  const at::Tensor yr = kernels::fp8_linear(at::cat({ar, at::gelu(pr, "tanh")}, -1), wq.data, wq.scale, b);
  yr.backward(dy);
  EXPECT_LT(max_rel(y.detach(), yr.detach()), tol);
  EXPECT_LT(max_rel(a.grad(), ar.grad()), tol);
  EXPECT_LT(max_rel(p.grad(), pr.grad()), tol);
  // The MLP's down projection: no prefix.
  at::Tensor q = p0.clone().requires_grad_(), qr = p0.clone().requires_grad_();
  const kernels::Fp8Tensor w2 = kernels::fp8_quantise(at::randn({out, m}, o.dtype(at::kFloat)), kernels::Fp8Scaling::PerTensor);
  const at::Tensor z = gelu_linear({}, q, w2.data, b, true, w2.scale);
  z.backward(dy);
  kernels::fp8_linear(at::gelu(qr, "tanh"), w2.data, w2.scale, b).backward(dy);
  EXPECT_LT(max_rel(z.detach(), kernels::fp8_linear(at::gelu(p0, "tanh"), w2.data, w2.scale, b)), tol);
  EXPECT_LT(max_rel(q.grad(), qr.grad()), tol);
  // With an input-side adapter on output columns [8, 28) (a standard-mode proj_out): the fp8 base
  // product plus peft's s B A x on the concatenated input, float32 masters.
  const at::Tensor down0 = at::randn({3, h + m}, o.dtype(at::kFloat)) * 0.3,
                   up0 = at::randn({20, 3}, o.dtype(at::kFloat)) * 0.3;
  at::Tensor dn = down0.clone().requires_grad_(), upa = up0.clone().requires_grad_();
  at::Tensor dnr = down0.clone().requires_grad_(), upr = up0.clone().requires_grad_();
  at::Tensor c = a0.clone().requires_grad_(), u = p0.clone().requires_grad_();
  at::Tensor cr = a0.clone().requires_grad_(), ur = p0.clone().requires_grad_();
  InputAdapters ad;
  ad.downs = {dn};
  ad.ups = {upa};
  ad.offsets = {8};
  ad.scales = {1.5};
  const at::Tensor ya = gelu_linear({c}, u, wq.data, b, true, wq.scale, ad);
  ya.backward(dy);
  const at::Tensor xr = at::cat({cr, at::gelu(ur, "tanh")}, -1);
  const at::Tensor lora = at::matmul(at::matmul(xr, dnr.to(xr.scalar_type()).t()), upr.to(xr.scalar_type()).t()) * 1.5;
  const at::Tensor yar = kernels::fp8_linear(xr, wq.data, wq.scale, b) + at::constant_pad_nd(lora, {8, out - 28});
  yar.backward(dy);
  EXPECT_LT(max_rel(ya.detach(), yar.detach()), tol);
  EXPECT_LT(max_rel(c.grad(), cr.grad()), tol);
  EXPECT_LT(max_rel(u.grad(), ur.grad()), tol);
  EXPECT_LT(max_rel(dn.grad(), dnr.grad()), tol);
  EXPECT_LT(max_rel(upa.grad(), upr.grad()), tol);
}

}  // namespace

TEST(Fp8Matmul, GeluLinearWithFp8WeightMatchesComposition) {
  check_gelu_linear_fp8(at::TensorOptions().dtype(at::kFloat), 1e-6);
}

// On CUDA (bf16): the two-block quantiser gives the same bits as quantising the concatenation,
// so the fused node and the composition agree to bf16 rounding of the same products.
TEST(Fp8Matmul, CudaGeluLinearWithFp8WeightMatchesComposition) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(32);
  for (int64_t k0 : {64, 40, 37}) {  // 64, 40: 16-byte vectors; 37: element by element
    const at::Tensor x0 = test_rows(9, k0, at::kBFloat16, 33).to(at::kCUDA);
    const at::Tensor x1 = test_rows(9, 200, at::kBFloat16, 34).to(at::kCUDA).narrow(1, 8, 136);
    const kernels::Fp8Rows two = kernels::fp8_quantise_row_blocks({x0, x1});
    const kernels::Fp8Rows one = kernels::fp8_quantise_rows(at::cat({x0, x1}, 1));
    EXPECT_TRUE(at::equal(two.scale, one.scale)) << k0;
    EXPECT_TRUE(at::equal(two.data.view(at::kByte), one.data.view(at::kByte))) << k0;
  }
  check_gelu_linear_fp8(at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA), 1e-2);
#endif
}

TEST(Fp8Matmul, ReferenceMmIsTheScaledProduct) {
  at::manual_seed(9);
  const at::Tensor a8 = (at::randn({5, 32}) * 40).to(at::kFloat8_e4m3fn), b8 = (at::randn({6, 32}) * 40).to(at::kFloat8_e4m3fn);
  const at::Tensor sa = at::rand({5, 1}), sb = at::rand({6});
  const at::Tensor want = at::mm(a8.to(at::kDouble) * sa.to(at::kDouble), (b8.to(at::kDouble) * sb.to(at::kDouble).unsqueeze(1)).t());
  EXPECT_LT(max_rel(kernels::fp8_scaled_mm_reference(a8, sa, b8, sb, at::kFloat), want), 1e-5);
  EXPECT_EQ(kernels::fp8_scaled_mm_reference(a8, sa, b8, sb, at::kBFloat16).scalar_type(), at::kBFloat16);
}

// The at::_scaled_mm path against the reference path on the same operands (bf16 output: 1e-2 of
// the largest magnitude), and the error of both against the dequantised bf16 product (printed).
TEST(Fp8Matmul, CudaScaledMmMatchesReference) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(11);
  const auto o = at::TensorOptions().device(at::kCUDA);
  for (auto scaling : {kernels::Fp8Scaling::PerChannel, kernels::Fp8Scaling::PerTensor}) {
    const int64_t m = 200, k = 256, n = 768;  // n >= 2k: the forward's default path too
    const kernels::Fp8Tensor wq = kernels::fp8_quantise(at::randn({n, k}, o) * at::rand({n, 1}, o), scaling);
    const at::Tensor x = at::randn({m, k}, o.dtype(at::kBFloat16)), dy = at::randn({m, n}, o.dtype(at::kBFloat16));
    const at::Tensor b = at::randn({n}, o.dtype(at::kBFloat16));
    EXPECT_EQ(kernels::fp8_forward_path(x, wq.data), Fp8Path::ScaledMm);
    const at::Tensor y = kernels::fp8_linear_forward(x, wq.data, wq.scale, b, Fp8Path::ScaledMm);
    const at::Tensor y_ref = kernels::fp8_linear_forward(x, wq.data, wq.scale, b, Fp8Path::Reference);
    const at::Tensor y_deq = kernels::fp8_linear_forward(x, wq.data, wq.scale, b, Fp8Path::Dequantise);
    EXPECT_EQ(y.scalar_type(), at::kBFloat16);
    EXPECT_LT(max_rel(y, y_ref), 1e-2);
    const at::Tensor dx = kernels::fp8_linear_input_grad(dy, wq.data, wq.scale, Fp8Path::ScaledMm);
    const at::Tensor dx_ref = kernels::fp8_linear_input_grad(dy, wq.data, wq.scale, Fp8Path::Reference);
    const at::Tensor dx_deq = kernels::fp8_linear_input_grad(dy, wq.data, wq.scale, Fp8Path::Dequantise);
    EXPECT_LT(max_rel(dx, dx_ref), 1e-2);
    // A narrowed column view of the codes (single blocks' linear2) goes the same way.
    const at::Tensor yn = kernels::fp8_linear_forward(x.narrow(1, 0, 128).contiguous(), wq.data.narrow(1, 0, 128),
                                                      wq.scale, b, Fp8Path::ScaledMm);
    const at::Tensor yn_ref = kernels::fp8_linear_forward(x.narrow(1, 0, 128).contiguous(), wq.data.narrow(1, 0, 128),
                                                          wq.scale, b, Fp8Path::Reference);
    EXPECT_LT(max_rel(yn, yn_ref), 1e-2);
    std::printf("fp8 matmul (%s): _scaled_mm vs reference fwd %.2e dx %.2e; vs dequantised bf16 GEMM fwd %.2e dx %.2e\n",
                scaling == kernels::Fp8Scaling::PerChannel ? "channel" : "tensor", max_rel(y, y_ref),
                max_rel(dx, dx_ref), max_rel(y, y_deq), max_rel(dx, dx_deq));
    EXPECT_LT(max_rel(y, y_deq), 0.1);
    EXPECT_LT(max_rel(dx, dx_deq), 0.1);
  }
#endif
}

TEST(Fp8Matmul, FlagNeedsFp8BaseAndParses) {
  dist::LowMemoryOptions o;
  o.fp8_matmul = true;
  expect_refused(o, {"--fp8_matmul", "--base_precision fp8"});
  o.base_precision = "fp8";
  EXPECT_NO_THROW(o.validate());

  namespace po = boost::program_options;
  dist::LowMemoryOptions p;
  po::options_description desc;
  dist::add_low_memory_options(desc, p);
  const char* argv[] = {"x", "--base_precision", "fp8", "--fp8_matmul"};
  po::variables_map vm;
  po::store(po::parse_command_line(4, argv, desc), vm);
  po::notify(vm);
  EXPECT_TRUE(p.fp8_matmul);
}

// A tiny float32 model through the fp8 provider: --fp8_matmul hands the stored form (no slot),
// and output, text gradient and LoRA gradients stay close to the dequantised run; the difference
// is the rowwise e4m3 rounding of activations and output gradients (3 mantissa bits).
TEST(Fp8Matmul, TinyModelCloseToDequantisedFp8) {
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 21, at::kFloat), cfg.depth, cfg.depth_single);
  dist::WeightsSource src;
  src.globals = original.globals();
  src.num_blocks = original.num_blocks();
  src.load_block = [&](int i) { return original.blocks()[i]; };
  for (bool modulation : {false, true}) {
    SCOPED_TRACE(modulation ? "fp8 modulation" : "bf16 modulation");
    dist::LowMemoryOptions lo;
    lo.base_precision = "fp8";
    lo.fp8_modulation = modulation;
    dist::LowMemoryPlan deq_plan, plan;
    auto deq = dist::compose_low_memory_weights(src, lo, at::kCPU, at::kFloat, nullptr, 0, &deq_plan);
    lo.fp8_matmul = true;
    auto mm = dist::compose_low_memory_weights(src, lo, at::kCPU, at::kFloat, nullptr, 0, &plan);
    // The plan (and so the estimator and --max_gpu_memory) counts, instead of the dequantisation
    // slot (the largest block in the compute dtype), the largest quantised weight (dequantised
    // per call where _scaled_mm does not apply).
    int64_t largest = 0, largest_weight = 0;
    dist::Fp8WeightsOptions fo;
    fo.quantise_modulation = modulation;
    for (const TensorMap& b : original.blocks()) {
      int64_t n = 0;
      for (const auto& kv : b) {
        n += kv.second.numel() * 4;
        if (dist::fp8_quantisable(kv.first, kv.second, fo)) largest_weight = std::max(largest_weight, kv.second.numel() * 4);
      }
      largest = std::max(largest, n);
    }
    src.block_shapes = [&](int i) {
      dist::BlockShapes s;
      for (const auto& [name, t] : original.blocks()[i]) s.emplace_back(name, t.sizes().vec());
      return s;
    };
    lo.fp8_matmul = false;
    const int64_t with_slot = dist::plan_low_memory_weights(src, lo, at::kFloat).device_weight_bytes;
    lo.fp8_matmul = true;
    EXPECT_EQ(with_slot - dist::plan_low_memory_weights(src, lo, at::kFloat).device_weight_bytes,
              largest - largest_weight);
    EXPECT_GT(largest_weight, 0);
    src.block_shapes = nullptr;
    auto* f = dynamic_cast<dist::Fp8BlockWeights*>(mm.get());
    ASSERT_NE(f, nullptr);
    EXPECT_TRUE(f->hands_stored());
    EXPECT_EQ(f->stats().slot_bytes, 0);
    {
      const TensorMap& b0 = mm->acquire(0);
      EXPECT_EQ(b0.at("img_attn.qkv.weight").scalar_type(), at::kFloat8_e4m3fn);
      EXPECT_EQ(b0.count(std::string("img_attn.qkv.weight") + kernels::kFp8ScaleSuffix), 1u);
      mm->release(0);
    }
    for (bool ckpt : {false, true}) {
      SCOPED_TRACE(ckpt ? "checkpointing" : "no checkpointing");
      const Result want = run(cfg, *deq, ckpt, 100, at::kFloat);
      const Result got = run(cfg, *mm, ckpt, 100, at::kFloat);
      const double e_out = max_rel(got.out, want.out), e_txt = max_rel(got.txt_grad, want.txt_grad);
      // LoRA gradients: the worst tensor (max-abs relative) and all of them together (L2).
      double e_lora = 0, diff2 = 0, ref2 = 0;
      ASSERT_EQ(got.lora_grads.size(), want.lora_grads.size());
      for (size_t k = 0; k < want.lora_grads.size(); ++k) {
        if (!want.lora_grads[k].defined()) continue;
        e_lora = std::max(e_lora, max_rel(got.lora_grads[k], want.lora_grads[k]));
        diff2 += (got.lora_grads[k] - want.lora_grads[k]).to(at::kDouble).pow(2).sum().item<double>();
        ref2 += want.lora_grads[k].to(at::kDouble).pow(2).sum().item<double>();
      }
      const double e_lora_l2 = std::sqrt(diff2 / ref2);
      std::printf("tiny model --fp8_matmul vs dequantised fp8 (%s, %s): output %.3e, txt grad %.3e, LoRA grads "
                  "worst %.3e, all (L2) %.3e\n",
                  modulation ? "fp8 modulation" : "bf16 modulation", ckpt ? "ckpt" : "no ckpt", e_out, e_txt, e_lora,
                  e_lora_l2);
      // Tolerances: e4m3 keeps 3 mantissa bits (relative rounding up to 1/16 per activation and
      // output-gradient element); forward products average it down to about 1e-2, gradients go
      // through several quantised products (measured: output 0.9-1.1e-2, txt 5-9e-2, LoRA worst
      // 0.13-0.18, all LoRA gradients together 4.2-4.8e-2 in L2).
      EXPECT_GT(e_out, 0.0);  // the activations really went through e4m3
      EXPECT_LT(e_out, 0.05);
      EXPECT_LT(e_txt, 0.2);
      EXPECT_LT(e_lora, 0.3);
      EXPECT_LT(e_lora_l2, 0.1);
    }
  }
}

// The MLP's down projection reads its pre-activation once (kernels/fp8_operands.cu): the last
// block enters as its tanh-GELU. Reference: ATen's at::gelu(x, "tanh") (the op PyTorch users run)
// on the same device, then the plain quantiser; exact. On CUDA that is the fused kernel against
// ATen's GELU kernel: bf16, f16 and float32; one block, two blocks, a row with no 16-byte vectors
// and a row longer than the registers hold (the two-pass kernel).
TEST(Fp8Matmul, QuantiserAppliesGeluToTheLastBlockAsAtenDoes) {
  std::vector<at::Device> devices{at::kCPU};
#ifdef FLUXTRAIN_WITH_CUDA
  if (at::hasCUDA()) devices.push_back(at::kCUDA);
#endif
  for (const auto& dev : devices) {
    for (auto dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
      SCOPED_TRACE(std::string(dev.is_cuda() ? "cuda " : "cpu ") + c10::toString(dt));
      // Pre-activations of FLUX's size range (|x| up to about 10) and the rows' extremes.
      const at::Tensor x0 = (test_rows(6, 64, at::kDouble, 41) * 1e-2).to(dt).to(dev);
      for (int64_t k1 : {3072, 200, 37, 25000}) {
        SCOPED_TRACE(k1);
        const at::Tensor pre = (test_rows(6, k1, at::kDouble, 42) * 1e-2).to(dt).to(dev);
        const at::Tensor act = at::gelu(pre, "tanh");
        for (bool two : {false, true}) {
          if (two && k1 == 37) continue;  // a 37-wide first block is covered by the unaligned second
          const kernels::Fp8Rows got =
              two ? kernels::fp8_quantise_row_blocks({x0, pre}, true) : kernels::fp8_quantise_row_blocks({pre}, true);
          const kernels::Fp8Rows want = kernels::fp8_quantise_rows(two ? at::cat({x0, act}, 1) : act);
          EXPECT_TRUE(at::equal(got.scale.cpu(), want.scale.cpu())) << (two ? "two blocks" : "one block");
          EXPECT_TRUE(at::equal(got.data.view(at::kByte).cpu(), want.data.view(at::kByte).cpu()))
              << (two ? "two blocks" : "one block");
        }
      }
    }
  }
}

// GELU's backward applied by the quantiser (kernels::fp8_quantise_gelu_grad_rows), against an
// independent reference: dact * GELU'(pre) with the derivative by central differences of GELU's
// definition x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in float64, times the column scales.
// Each dequantised value (code * row scale) must lie within e4m3's rounding of it: 2^-4 of its
// magnitude (3 mantissa bits, round to nearest), plus the smallest subnormal step of the row
// (2^-9 * scale) and float32's rounding of the gradient. float32 activations (CPU).
TEST(Fp8Matmul, GeluGradQuantiserMatchesGelusDerivative) {
  at::manual_seed(44);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor pre = at::randn({5, 96}, f64) * 3, dact = at::randn({5, 96}, f64) * at::rand({5, 1}, f64);
  const at::Tensor col = at::rand({96}, f64) + 0.5;
  const kernels::Fp8Rows q = kernels::fp8_quantise_gelu_grad_rows(dact.to(at::kFloat), pre.to(at::kFloat), col.to(at::kFloat));
  const double k = std::sqrt(2.0 / M_PI), h = 1e-5;
  auto gelu = [&](const at::Tensor& x) { return 0.5 * x * (1.0 + at::tanh(k * (x + 0.044715 * x * x * x))); };
  const at::Tensor p32 = pre.to(at::kFloat).to(at::kDouble), d32 = dact.to(at::kFloat).to(at::kDouble);
  const at::Tensor exact = d32 * (gelu(p32 + h) - gelu(p32 - h)) / (2 * h) * col.to(at::kFloat).to(at::kDouble);
  const at::Tensor deq = q.data.to(at::kDouble) * q.scale.to(at::kDouble);
  const at::Tensor bound = exact.abs() * (0.0625 + 1e-6) + q.scale.to(at::kDouble) * std::ldexp(1.0, -9);
  EXPECT_TRUE(((deq - exact).abs() <= bound).all().item<bool>()) << "max excess "
      << ((deq - exact).abs() - bound).max().item<double>();
  // The row scale is the row's largest magnitude over 448 (to e4m3's and float32's rounding).
  const at::Tensor s_want = exact.abs().amax(1, true) / 448.0;
  EXPECT_LT(((q.scale.to(at::kDouble) - s_want).abs() / s_want).max().item<double>(), 1e-5);
}

// On CUDA the one-pass kernel gives the bits of the composition, at::gelu_backward then the
// quantiser (the CUDA kernel evaluates ATen's GeluBackwardCUDAKernelImpl formula): bf16, f16, f32;
// rows of 12288 (the register kernel), 40000 (two passes) and 37 (unaligned, element by element);
// per-column and single column scales, and none.
TEST(Fp8Matmul, CudaGeluGradQuantiserMatchesAtensBackward) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (auto dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (int64_t k : {12288, 40000, 37}) {
      SCOPED_TRACE(std::string(c10::toString(dt)) + " k=" + std::to_string(k));
      const at::Tensor pre = (test_rows(6, k, at::kDouble, 45) * 1e-2).to(dt).cuda();
      const at::Tensor dact = test_rows(6, k, at::kDouble, 46).to(dt).cuda();
      const at::Tensor dpre = at::gelu_backward(dact, pre, "tanh");
      for (int cols : {0, 1, 2}) {
        const at::Tensor col = cols == 0 ? at::Tensor()
                               : cols == 1 ? at::rand({1}, at::kFloat).cuda() + 0.5
                                           : at::rand({k}, at::kFloat).cuda() + 0.5;
        const kernels::Fp8Rows got = kernels::fp8_quantise_gelu_grad_rows(dact, pre, col);
        const kernels::Fp8Rows want = kernels::fp8_quantise_rows(dpre, col);
        EXPECT_TRUE(at::equal(got.scale.cpu(), want.scale.cpu())) << cols;
        const at::Tensor differ = got.data.view(at::kByte).cpu() != want.data.view(at::kByte).cpu();
        EXPECT_EQ(differ.sum().item<int64_t>(), 0) << cols;
      }
    }
  }
#endif
}

// The fast (logistic) forms of GELU and its derivative in the CUDA quantisers (fp8_set_fast_gelu,
// kernels/fp8_matmul.h), against GELU's definition in float64 (its derivative by central
// differences): each dequantised value within e4m3's rounding (2^-4 of its magnitude, plus the
// row's subnormal step 2^-9 * scale) of the exact one, plus 2^-8 of it for the rounding to the
// activation's dtype and the fast forms' float32 error. Pre-activations from -90 (the clamped
// exponent) to +90 and the usual range. Also prints how many codes equal the exact forms'.
TEST(Fp8Matmul, CudaFastGeluFormsMatchGelusDefinition) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const bool was = kernels::fp8_fast_gelu();
  at::manual_seed(48);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t k = 12288;
  at::Tensor pre64 = at::randn({4, k}, f64) * 3;
  pre64[3] = at::linspace(-90, 90, k, f64);
  const at::Tensor dact64 = at::randn({4, k}, f64);
  const double kb = std::sqrt(2.0 / M_PI), h = 1e-5;
  auto gelu = [&](const at::Tensor& x) { return 0.5 * x * (1.0 + at::tanh(kb * (x + 0.044715 * x * x * x))); };
  for (auto dt : {at::kBFloat16, at::kFloat}) {
    SCOPED_TRACE(c10::toString(dt));
    const at::Tensor pre = pre64.to(dt).cuda(), dact = dact64.to(dt).cuda();
    const at::Tensor p = pre.cpu().to(at::kDouble), d = dact.cpu().to(at::kDouble);
    const at::Tensor want_act = gelu(p), want_grad = d * (gelu(p + h) - gelu(p - h)) / (2 * h);
    for (bool grad : {false, true}) {
      kernels::fp8_set_fast_gelu(true);
      const kernels::Fp8Rows fast = grad ? kernels::fp8_quantise_gelu_grad_rows(dact, pre)
                                         : kernels::fp8_quantise_row_blocks({pre}, /*gelu_last=*/true);
      kernels::fp8_set_fast_gelu(false);
      const kernels::Fp8Rows exact = grad ? kernels::fp8_quantise_gelu_grad_rows(dact, pre)
                                          : kernels::fp8_quantise_row_blocks({pre}, /*gelu_last=*/true);
      const at::Tensor want = grad ? want_grad : want_act;
      const at::Tensor scale = fast.scale.cpu().to(at::kDouble);
      const at::Tensor deq = fast.data.cpu().to(at::kDouble) * scale;
      const at::Tensor bound = want.abs() * (0.0625 + 0.0039) + scale * std::ldexp(1.0, -9);
      EXPECT_TRUE(((deq - want).abs() <= bound).all().item<bool>())
          << (grad ? "gradient" : "activation") << ": max excess " << ((deq - want).abs() - bound).max().item<double>();
      const double same = (fast.data.view(at::kByte) == exact.data.view(at::kByte)).to(at::kDouble).mean().item<double>();
      std::printf("[fast gelu] %s %s: %.4f of the codes equal the exact forms'\n", c10::toString(dt),
                  grad ? "gradient" : "activation", same);
    }
  }
  kernels::fp8_set_fast_gelu(was);
#endif
}

// fp8_gelu_mlp (one node for the up projection, GELU and the down projection, model/gelu_linear.h)
// against its composition, fp8_linear then gelu_linear, on the same fp8 weights: the same
// products, so the outputs agree to rounding, and so do the gradients of x and of the second
// input (GELU's backward by the quantiser instead of a kernel of its own). With the output left
// uncomputed: the same gradients. CPU float32 (1e-6) and, on CUDA, bf16 (the same bits expected:
// printed; 1e-2 asserted).
void check_gelu_mlp(const at::TensorOptions& o, double tol) {
  at::manual_seed(47);
  const int64_t h = 32, m = 96, out = 48, rows = 40;
  const kernels::Fp8Tensor wu = kernels::fp8_quantise(at::randn({m, h}, o.dtype(at::kFloat)) / 4, kernels::Fp8Scaling::PerChannel);
  const kernels::Fp8Tensor wd = kernels::fp8_quantise(at::randn({out, h + m}, o.dtype(at::kFloat)) / 8, kernels::Fp8Scaling::PerChannel);
  const at::Tensor bu = at::randn({m}, o), bd = at::randn({out}, o);
  const at::Tensor x0 = at::randn({1, rows, h}, o), a0 = at::randn({1, rows, h}, o), dy = at::randn({1, rows, out}, o);
  for (bool compute : {true, false}) {
    at::Tensor x = x0.clone().requires_grad_(), a = a0.clone().requires_grad_();
    const at::Tensor y = fp8_gelu_mlp(x, wu.data, bu, wu.scale, {a}, wd.data, bd, wd.scale, compute);
    y.backward(dy);
    at::Tensor xr = x0.clone().requires_grad_(), ar = a0.clone().requires_grad_();
    const at::Tensor pre = kernels::fp8_linear(xr, wu.data, wu.scale, bu);
    const at::Tensor yr = gelu_linear({ar}, pre, wd.data, bd, true, wd.scale);
    yr.backward(dy);
    if (compute) {
      EXPECT_LT(max_rel(y.detach(), yr.detach()), tol);
      std::printf("[fp8_gelu_mlp] %s: y %.3g, dx %.3g, da %.3g\n", o.device().is_cuda() ? "cuda" : "cpu",
                  max_rel(y.detach(), yr.detach()), max_rel(x.grad(), xr.grad()), max_rel(a.grad(), ar.grad()));
    }
    EXPECT_LT(max_rel(x.grad(), xr.grad()), tol) << compute;
    EXPECT_LT(max_rel(a.grad(), ar.grad()), tol) << compute;
  }
}

TEST(Fp8Matmul, GeluMlpNodeMatchesComposition) { check_gelu_mlp(at::TensorOptions().dtype(at::kFloat), 1e-6); }

TEST(Fp8Matmul, CudaGeluMlpNodeMatchesComposition) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  check_gelu_mlp(at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA), 1e-2);
#endif
}

// --fp8_keep_transposed's registry (kernels/fp8_matmul.h): a registered weight's transposed codes
// are made once per view and then handed out again; an unregistered weight's are made per call;
// a freed weight's copies are dropped. Reference: ATen's transpose of the same codes, bit for bit.
TEST(Fp8Matmul, KeptTransposesAreReusedPerViewAndDroppedWithTheirWeight) {
  kernels::fp8_drop_kept_transposed();
  at::manual_seed(43);
  at::Tensor w8 = (at::randn({48, 32}) * 30).to(at::kFloat8_e4m3fn);
  const at::Tensor other = (at::randn({48, 32}) * 30).to(at::kFloat8_e4m3fn);
  const auto bytes_of = [](const at::Tensor& t) { return t.view(at::kByte); };
  kernels::fp8_keep_transposed(w8);
  kernels::fp8_keep_transposed(w8);  // twice: still one registration
  const at::Tensor a = kernels::fp8_transposed_for_input_grad(w8);
  const at::Tensor b = kernels::fp8_transposed_for_input_grad(w8);
  EXPECT_TRUE(at::equal(bytes_of(a), bytes_of(w8.t().contiguous())));
  EXPECT_EQ(a.data_ptr(), b.data_ptr());  // kept
  at::Tensor rows = w8.narrow(0, 16, 16);  // a view: its own kept transpose
  const at::Tensor r1 = kernels::fp8_transposed_for_input_grad(rows);
  EXPECT_TRUE(at::equal(bytes_of(r1), bytes_of(rows.t().contiguous())));
  EXPECT_EQ(r1.data_ptr(), kernels::fp8_transposed_for_input_grad(rows).data_ptr());
  EXPECT_EQ(kernels::fp8_kept_transposed_bytes(), 48 * 32 + 16 * 32);
  const at::Tensor o1 = kernels::fp8_transposed_for_input_grad(other);
  EXPECT_NE(o1.data_ptr(), kernels::fp8_transposed_for_input_grad(other).data_ptr());  // not registered
  EXPECT_TRUE(at::equal(bytes_of(o1), bytes_of(other.t().contiguous())));
  // The weight freed (with its view): its copies no longer count, and a new tensor is never
  // handed them.
  w8 = at::Tensor();
  rows = at::Tensor();
  EXPECT_EQ(kernels::fp8_kept_transposed_bytes(), 0);
  const at::Tensor fresh = (at::randn({48, 32}) * 30).to(at::kFloat8_e4m3fn);
  EXPECT_TRUE(at::equal(bytes_of(kernels::fp8_transposed_for_input_grad(fresh)), bytes_of(fresh.t().contiguous())));
  kernels::fp8_drop_kept_transposed();
}

// --fp8_keep_transposed through the provider stack: it needs --fp8_matmul; the plan counts the
// resident blocks' codes once more (streamed blocks are not kept); a tiny model's output and
// gradients are bit-identical with and without it (the same codes, transposed once or per step).
TEST(Fp8Matmul, KeepTransposedTinyModelIsBitIdenticalAndCounted) {
  dist::LowMemoryOptions bad;
  bad.base_precision = "fp8";
  bad.fp8_keep_transposed = true;
  expect_refused(bad, {"--fp8_keep_transposed", "--fp8_matmul"});
  const FluxConfig cfg = deeper_tiny();
  ResidentBlockWeights original(init_random_weights(cfg, 22, at::kFloat), cfg.depth, cfg.depth_single);
  const dist::WeightsSource src = source_of(original);
  dist::LowMemoryOptions lo;
  lo.base_precision = "fp8";
  lo.fp8_matmul = true;
  auto plain = dist::compose_low_memory_weights(src, lo, at::kCPU, at::kFloat);
  const Result want = run(cfg, *plain, false, 100, at::kFloat);
  for (int64_t swap : {0, 1}) {
    SCOPED_TRACE(swap ? "one block streamed" : "all resident");
    kernels::fp8_drop_kept_transposed();
    lo.fp8_keep_transposed = true;
    lo.blocks_to_swap = swap;
    dist::LowMemoryPlan plan;
    auto kept = dist::compose_low_memory_weights(src, lo, at::kCPU, at::kFloat, nullptr, 0, &plan);
    int64_t codes = 0;
    const std::vector<bool> streamed = dist::spread_streamed_blocks(src.num_blocks, static_cast<int>(swap));
    dist::Fp8WeightsOptions fo;
    for (int i = 0; i < src.num_blocks; ++i)
      for (const auto& kv : original.blocks()[i])
        if (!streamed[i] && dist::fp8_quantisable(kv.first, kv.second, fo)) codes += kv.second.numel();
    EXPECT_EQ(plan.kept_transposed_bytes, codes);
    EXPECT_NE(plan.describe().find("transposed codes kept"), std::string::npos) << plan.describe();
    const Result got = run(cfg, *kept, false, 100, at::kFloat);
    EXPECT_GT(kernels::fp8_kept_transposed_bytes(), 0);
    EXPECT_LE(kernels::fp8_kept_transposed_bytes(), codes);
    expect_identical(got, want);
    // The provider unregisters its codes when it goes: with one of them still held elsewhere
    // (its storage alive), nothing stays kept.
    const at::Tensor held = kept->acquire(src.num_blocks - 1).at("linear1.weight");
    kept->release(src.num_blocks - 1);
    kept.reset();
    EXPECT_EQ(kernels::fp8_kept_transposed_bytes(), 0);
  }
  kernels::fp8_drop_kept_transposed();
}
