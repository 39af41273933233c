// fp8 e4m3 quantisation against a float64 re-computation of the format from its definition
// (OCP 8-bit floating point, E4M3: exponent bias 7, subnormals at exponent 0, no infinities,
// S.1111.111 is NaN, largest finite 448), with the saturating policy of kernels/fp8.h.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>

#include "kernels/fp8.h"

using namespace fluxtrain;
using kernels::Fp8Scaling;

namespace {

// The value of code c by the definition (NaN for the two NaN codes).
double e4m3_value(int c) {
  const int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? std::ldexp(m / 8.0, 1 - 7) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -mag : mag;
}

// Round-to-nearest, ties to the even code, saturating at +-448; NaN stays NaN.
double e4m3_round(double x) {
  if (std::isnan(x)) return x;
  const double a = std::fabs(x);
  if (a >= 448.0) return std::copysign(448.0, x);
  int best = 0;
  double best_d = std::numeric_limits<double>::infinity();
  for (int c = 0; c < 127; ++c) {  // the non-negative finite codes, ascending in value
    const double d = std::fabs(e4m3_value(c) - a);
    if (d < best_d || (d == best_d && (c & 1) == 0)) best = c, best_d = d;
  }
  return std::copysign(e4m3_value(best), x);
}

bool same(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

}  // namespace

TEST(Fp8, DecodeOfEveryCodeMatchesDefinition) {
  at::Tensor codes = at::arange(256, at::kInt).to(at::kByte);
  at::Tensor q = at::empty({256}, at::kFloat8_e4m3fn);
  std::memcpy(q.data_ptr(), codes.data_ptr(), 256);
  at::Tensor v = q.to(at::kDouble);
  for (int c = 0; c < 256; ++c) EXPECT_TRUE(same(v[c].item<double>(), e4m3_value(c))) << "code " << c;
  EXPECT_EQ(e4m3_value(0x7E), 448.0);
  EXPECT_EQ(e4m3_value(0x01), std::ldexp(1.0, -9));  // smallest subnormal
}

TEST(Fp8, RoundingTiesSubnormalsSaturationNaN) {
  std::vector<float> xs;
  std::vector<double> pos;
  for (int c = 0; c < 127; ++c) pos.push_back(e4m3_value(c));
  for (size_t i = 0; i < pos.size(); ++i) {
    xs.push_back(static_cast<float>(pos[i]));
    if (i + 1 < pos.size()) {
      const float mid = static_cast<float>((pos[i] + pos[i + 1]) / 2);  // exact in float32: a tie
      xs.push_back(mid);
      xs.push_back(std::nextafter(mid, 0.f));
      xs.push_back(std::nextafter(mid, 1e9f));
    }
  }
  for (float x : {448.f, std::numeric_limits<float>::infinity(),
                  std::ldexp(1.f, -10), std::ldexp(1.f, -11), std::ldexp(3.f, -11), 1e-30f, 0.f})
    xs.push_back(x);
  auto gen = at::detail::createCPUGenerator(3);
  at::Tensor r = at::exp(at::rand({4000}, gen, at::kDouble) * 20 - 14).to(at::kFloat);  // e^-14 .. e^6 (< 448)
  for (int64_t i = 0; i < r.numel(); ++i) xs.push_back(r[i].item<float>());
  const size_t n = xs.size();
  for (size_t i = 0; i < n; ++i) xs.push_back(-xs[i]);
  xs.push_back(std::numeric_limits<float>::quiet_NaN());

  // Per-tensor scale 1 needs a finite amax of 448 (present above); checked exactly.
  at::Tensor w = at::from_blob(xs.data(), {static_cast<int64_t>(xs.size())}, at::kFloat).clone();
  kernels::Fp8Tensor q = kernels::fp8_quantise(w, Fp8Scaling::PerTensor);
  ASSERT_EQ(q.scale.item<float>(), 1.f);
  at::Tensor got = q.data.to(at::kDouble);
  int bad = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const double want = e4m3_round(xs[i]);
    if (!same(got[i].item<double>(), want) && ++bad < 10)
      ADD_FAILURE() << "x=" << xs[i] << " got " << got[i].item<double>() << " want " << want;
    if (want == 0 && !std::isnan(want))  // the sign of zero survives
      EXPECT_EQ(std::signbit(got[i].item<double>()), std::signbit(xs[i])) << xs[i];
  }
  EXPECT_EQ(bad, 0);
}

TEST(Fp8, ScalesPerChannelAndPerTensor) {
  auto gen = at::detail::createCPUGenerator(5);
  at::Tensor w = at::randn({6, 40}, gen, at::kFloat) * at::arange(1, 7, at::kFloat).reshape({6, 1});
  w[2].zero_();                                               // an all-zero row: scale 1
  w[3][5] = std::numeric_limits<float>::infinity();           // ignored by amax, saturates
  w[4][7] = std::numeric_limits<float>::quiet_NaN();          // ignored by amax, stays NaN
  for (Fp8Scaling sc : {Fp8Scaling::PerChannel, Fp8Scaling::PerTensor}) {
    kernels::Fp8Tensor q = kernels::fp8_quantise(w.to(at::kBFloat16).to(at::kFloat), sc);
    at::Tensor wf = w.to(at::kBFloat16).to(at::kFloat);
    const int64_t rows = sc == Fp8Scaling::PerChannel ? 6 : 1;
    ASSERT_EQ(q.scale.numel(), rows);
    for (int64_t r = 0; r < rows; ++r) {
      float amax = 0;
      for (int64_t i = (rows == 1 ? 0 : r); i < (rows == 1 ? 6 : r + 1); ++i)
        for (int64_t j = 0; j < 40; ++j) {
          const float v = wf[i][j].item<float>();
          if (std::isfinite(v)) amax = std::max(amax, std::fabs(v));
        }
      const float want = amax > 0 ? amax / 448.f : 1.f;
      EXPECT_EQ(q.scale[r].item<float>(), want) << "row " << r;
    }
    at::Tensor codes = q.data.to(at::kDouble);
    EXPECT_EQ(codes[3][5].item<double>(), 448.0) << "infinity saturates";
    for (int64_t i = 0; i < 6; ++i)
      for (int64_t j = 0; j < 40; ++j) {
        const float s = q.scale[rows == 1 ? 0 : i].item<float>();
        const float x = wf[i][j].item<float>() / s;  // the definition's float32 division
        EXPECT_TRUE(same(codes[i][j].item<double>(), e4m3_round(x))) << i << "," << j;
      }
    // Dequantised: float32(q) * scale in one float32 rounding (exact product rounded once),
    // then one rounding to the output dtype.
    for (at::ScalarType dt : {at::kBFloat16, at::kFloat, at::kDouble}) {
      at::Tensor got = kernels::fp8_dequantise(q.data, q.scale, dt);
      at::Tensor prod = at::empty({6, 40}, at::kDouble);
      for (int64_t i = 0; i < 6; ++i)
        for (int64_t j = 0; j < 40; ++j)
          prod[i][j] = static_cast<double>(static_cast<float>(codes[i][j].item<double>() *
                                                              q.scale[rows == 1 ? 0 : i].item<float>()));
      at::Tensor want = prod.to(at::kFloat).to(dt);
      EXPECT_TRUE(at::equal(at::nan_to_num(got.to(at::kDouble), 7.0), at::nan_to_num(want.to(at::kDouble), 7.0))) << dt;
      EXPECT_TRUE(std::isnan(got[4][7].item<double>()));
    }
  }
}

TEST(Fp8, CudaDequantiseMatchesReferenceBitwise) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  auto gen = at::detail::createCPUGenerator(9);
  // 301 columns: the byte-wise kernel; 320: 16 codes per thread.
  for (int64_t cols : {301, 320}) {
    at::Tensor w = at::randn({37, cols}, gen, at::kFloat);
    for (Fp8Scaling sc : {Fp8Scaling::PerChannel, Fp8Scaling::PerTensor}) {
      kernels::Fp8Tensor q = kernels::fp8_quantise(w, sc);
      // Every code, NaN included, passes through the kernel.
      at::Tensor all = at::arange(256, at::kInt).to(at::kByte).repeat({37, 2}).narrow(1, 0, cols).contiguous();
      std::memcpy(q.data.data_ptr(), all.data_ptr(), all.numel());
      for (at::ScalarType dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
        at::Tensor want = at::empty(q.data.sizes(), at::TensorOptions().dtype(dt));
        kernels::fp8_dequantise_reference_into(q.data, q.scale, want);
        at::Tensor got = at::empty(q.data.sizes(), at::TensorOptions().dtype(dt).device(at::kCUDA));
        kernels::fp8_dequantise_cuda_into(q.data.cuda(), q.scale.cuda(), got);
        at::Tensor g = got.cpu().to(at::kDouble), r = want.to(at::kDouble);
        EXPECT_TRUE(at::equal(at::isnan(g), at::isnan(r))) << dt << " " << cols;
        EXPECT_TRUE(at::equal(at::nan_to_num(g, 0.0), at::nan_to_num(r, 0.0))) << dt << " " << cols;
      }
    }
  }
#endif
}
