// CUDA kernels against their CPU references (skipped where no GPU is present).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include "kernels/rope.h"
#include "support/test_util.h"

using namespace fluxtrain;

TEST(Kernels, RopeCudaMatchesReference) {
#ifndef FLUXTRAIN_WITH_CUDA
  GTEST_SKIP() << "CPU build";
#else
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(1);
  for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (bool inverse : {false, true}) {
      const int64_t B = 2, H = 3, L = 37, D = 16;
      // [B, L, H, D] memory viewed as [B, H, L, D]: the layout the model hands over.
      at::Tensor base = at::randn({B, L, H, D}, at::TensorOptions().dtype(dt).device(at::kCUDA));
      at::Tensor x = base.permute({0, 2, 1, 3});
      at::Tensor ang = at::rand({L, D / 2}, at::kDouble) * 50;
      at::Tensor c = at::cos(ang).to(at::kFloat), s = at::sin(ang).to(at::kFloat);
      at::Tensor got = kernels::rope_rotate_cuda(x, c.cuda(), s.cuda(), inverse).cpu();
      // float64 truth; float32 lands at rounding level, bf16/f16 at one rounding of the output.
      at::Tensor want = kernels::rope_rotate_reference(x.cpu().to(at::kDouble), at::cos(ang), at::sin(ang), inverse);
      const double tol = dt == at::kFloat ? 1e-6 : dt == at::kHalf ? 2e-3 : 1e-2;
      EXPECT_LT(rel_err(got, want), tol) << dt << " inverse=" << inverse;
      EXPECT_TRUE(got.is_contiguous());
    }
  }
#endif
}
