// lora_linear (src/model/lora_linear.h), the hand-written forward and backward of a frozen linear
// with input-side adapters, against the formula written with plain float64 ops and differentiated
// by autograd: y = x w^T + b; y[:, o_i : o_i + n_i] += s_i (x D_i^T) U_i^T.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "model/lora_linear.h"

namespace {

struct Adapter {
  int64_t offset, rows, rank;
  double scale;
};

double rel_err(const at::Tensor& got, const at::Tensor& want) {
  at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  return (g - w).abs().max().item<double>() / std::max(w.abs().max().item<double>(), 1e-300);
}

// Two adapters with gaps before, between and after them (rows 0-1, 8-10 and 17-19 have none),
// scales other than 1, and a 3-D input. row1 >= 0: the adapters act on flattened input rows
// [row0, row1) only (the reference masks their products elsewhere), whose values are handed over
// as a separate tensor when rows_given.
void check(at::ScalarType dt, double tol, bool x_needs_grad, int64_t row0 = 0, int64_t row1 = -1,
           bool rows_given = false) {
  at::manual_seed(3);
  const int64_t in = 12, out = 20;
  const std::vector<Adapter> ads{{2, 6, 3, 0.5}, {11, 6, 2, 2.0}};
  at::Tensor x = at::randn({2, 5, in}, at::kDouble), w = at::randn({out, in}, at::kDouble) * 0.3,
             b = at::randn({out}, at::kDouble);
  std::vector<at::Tensor> downs, ups;
  std::vector<int64_t> offsets;
  std::vector<double> scales;
  const auto master = dt == at::kDouble ? at::kDouble : at::kFloat;  // float32 masters for lower dtypes
  for (const auto& a : ads) {
    downs.push_back((at::randn({a.rank, in}, at::kDouble) * 0.4).to(master).requires_grad_());
    ups.push_back((at::randn({a.rows, a.rank}, at::kDouble) * 0.4).to(master).requires_grad_());
    offsets.push_back(a.offset);
    scales.push_back(a.scale);
  }
  at::Tensor dy = at::randn({2, 5, out}, at::kDouble);

  // Reference from the inputs as the tested run sees them (rounded to dt), in float64.
  at::Tensor xr = x.to(dt).to(at::kDouble).requires_grad_(x_needs_grad), wr = w.to(dt).to(at::kDouble),
             br = b.to(dt).to(at::kDouble);
  std::vector<at::Tensor> dr, ur;
  for (size_t i = 0; i < ads.size(); ++i) {
    dr.push_back(downs[i].detach().to(at::kDouble).requires_grad_());
    ur.push_back(ups[i].detach().to(at::kDouble).requires_grad_());
  }
  std::vector<at::Tensor> cols;
  at::Tensor base = at::matmul(xr, wr.t()) + br;
  at::Tensor mask = at::ones({2, 5, 1}, at::kDouble);
  if (row1 >= 0) {
    mask.zero_();
    mask.view({-1}).narrow(0, row0, row1 - row0).fill_(1.0);
  }
  int64_t pos = 0;
  for (size_t i = 0; i < ads.size(); ++i) {
    if (ads[i].offset > pos) cols.push_back(base.narrow(2, pos, ads[i].offset - pos));
    cols.push_back(base.narrow(2, ads[i].offset, ads[i].rows) +
                   ads[i].scale * at::matmul(at::matmul(xr, dr[i].t()), ur[i].t()) * mask);
    pos = ads[i].offset + ads[i].rows;
  }
  if (pos < out) cols.push_back(base.narrow(2, pos, out - pos));
  at::Tensor want = at::cat(cols, 2);
  std::vector<at::Tensor> want_inputs;
  if (x_needs_grad) want_inputs.push_back(xr);
  for (size_t i = 0; i < ads.size(); ++i) want_inputs.push_back(dr[i]), want_inputs.push_back(ur[i]);
  auto want_g = torch::autograd::grad({want}, want_inputs, {dy.to(dt).to(at::kDouble)});

  at::Tensor xt = x.to(dt).requires_grad_(x_needs_grad);
  at::Tensor rows_x;
  if (rows_given) rows_x = xt.detach().reshape({-1, in}).narrow(0, row0, row1 - row0).clone();
  at::Tensor got = row1 >= 0 ? fluxtrain::lora_linear(xt, w.to(dt), b.to(dt), downs, ups, offsets, scales, {}, row0,
                                                      row1, rows_x)
                             : fluxtrain::lora_linear(xt, w.to(dt), b.to(dt), downs, ups, offsets, scales);
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_EQ(got.scalar_type(), dt);
  EXPECT_LT(rel_err(got, want), tol) << "y";
  std::vector<at::Tensor> inputs;
  if (x_needs_grad) inputs.push_back(xt);
  for (size_t i = 0; i < ads.size(); ++i) inputs.push_back(downs[i]), inputs.push_back(ups[i]);
  auto g = torch::autograd::grad({got}, inputs, {dy.to(dt)});
  ASSERT_EQ(g.size(), want_g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    EXPECT_EQ(g[i].sizes(), want_g[i].sizes()) << i;
    EXPECT_EQ(g[i].scalar_type(), inputs[i].scalar_type()) << i;  // masters get gradients in their dtype
    EXPECT_LT(rel_err(g[i], want_g[i]), tol) << "gradient " << i;
  }
}

}  // namespace

// float64 operands: the same formula up to summation order (1e-12). float32: rounding of the
// float32 masters is exact in the reference, products round at 2^-24 (1e-5). bf16: every product
// rounds to bf16 (2^-9 relative) and the delta is added before the output is rounded (2e-2).
TEST(LoraLinear, MatchesFormulaInFloat64) { check(at::kDouble, 1e-12, true); }
TEST(LoraLinear, MatchesFormulaInFloat32) { check(at::kFloat, 1e-5, true); }
TEST(LoraLinear, MatchesFormulaInBfloat16) { check(at::kBFloat16, 2e-2, true); }
TEST(LoraLinear, InputWithoutGradient) { check(at::kDouble, 1e-12, false); }
// Adapters on a row range (a single block's condition rows in one GEMM with the main rows,
// model/blocks.cpp): rows 3-7 of the 10 flattened rows, inside one batch entry and across two.
TEST(LoraLinear, AdapterRowRange) {
  check(at::kDouble, 1e-12, true, 3, 8);
  check(at::kDouble, 1e-12, true, 5, 10, /*rows_given=*/true);
  check(at::kFloat, 1e-5, true, 0, 4, true);
  check(at::kDouble, 1e-12, false, 6, 9, true);
}

// output_lora (EasyControl's proj_loras: h + scale * (h D^T) U^T) against the formula on plain
// float64 ops differentiated by autograd. float64 1e-12; float32 masters and activations 1e-5.
TEST(OutputLora, MatchesFormula) {
  for (auto dt : {at::kDouble, at::kFloat}) {
    at::manual_seed(7);
    const int64_t n = 10, r = 3;
    for (double scale : {1.0, 0.75}) {
      at::Tensor y = at::randn({2, 4, n}, at::kDouble), d = at::randn({r, n}, at::kDouble) * 0.4,
                 u = at::randn({n, r}, at::kDouble) * 0.4, g = at::randn({2, 4, n}, at::kDouble);
      at::Tensor yr = y.clone().requires_grad_(), dr = d.clone().requires_grad_(), ur = u.clone().requires_grad_();
      at::Tensor want = yr + scale * at::matmul(at::matmul(yr, dr.t()), ur.t());
      auto wg = torch::autograd::grad({want}, {yr, dr, ur}, {g});
      at::Tensor yt = y.to(dt).requires_grad_(), dt_ = d.to(dt).requires_grad_(), ut = u.to(dt).requires_grad_();
      at::Tensor got = fluxtrain::output_lora(yt, dt_, ut, scale);
      auto gg = torch::autograd::grad({got}, {yt, dt_, ut}, {g.to(dt)});
      const double tol = dt == at::kDouble ? 1e-12 : 1e-5;
      EXPECT_LT(rel_err(got, want), tol) << dt << " y";
      for (int i = 0; i < 3; ++i) EXPECT_LT(rel_err(gg[i], wg[i]), tol) << dt << " gradient " << i;
    }
  }
}
