// The tuned GEMMs (kernels/gemm_tuned.h):
//  - on the CPU every function is the ATen op it stands for, bit for bit (gemm = at::mm /
//    at::addmm, gemm_into = addmm in place, frozen_linear_tuned = at::linear with its gradient);
//  - the operand layouts cuBLASLt is handed (row- and column-contiguous views, narrowed ones);
//  - the tuning file: choices per device kept across rewrites, malformed lines skipped, an
//    unwritable path reported and nothing written;
//  - on CUDA (GPU runs only): the cuBLASLt product against a float64 product for both operand
//    layouts, a narrowed output, beta 0 and 1, alpha != 1 and the bias epilogue (bf16 1e-2, f16
//    2e-3 of the largest magnitude: one rounding of the output plus float32 accumulation); a
//    second process's view (the file read back) takes the same algorithm and gives the same bits;
//    a shape first met inside a CUDA graph capture takes the heuristic's choice, and replay and
//    eager give the same bits; frozen_linear_tuned's gradient against at::linear's in float64.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#ifdef FLUXTRAIN_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "kernels/gemm_tuned.h"
#include "support/test_util.h"

using namespace fluxtrain;

namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("fluxtrain_" + name + "_" + std::to_string(::getpid()))).string();
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

TEST(GemmTuned, CpuDispatchIsAtensOps) {
  at::manual_seed(1);
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    const auto o = at::TensorOptions().dtype(dt);
    at::Tensor a = at::randn({7, 5}, o), b = at::randn({5, 6}, o), bias = at::randn({6}, o);
    EXPECT_TRUE(at::equal(kernels::gemm(a, b), at::mm(a, b)));
    EXPECT_TRUE(at::equal(kernels::gemm(a, b, bias), at::addmm(bias, a, b)));
    at::Tensor c = at::randn({7, 9}, o), want = c.clone();
    kernels::gemm_into(c.narrow(1, 2, 6), a, b, 1.0, 0.5);
    want.narrow(1, 2, 6).addmm_(a, b, 1.0, 0.5);
    EXPECT_TRUE(at::equal(c, want));
    at::Tensor d = at::full({7, 6}, NAN, o);
    kernels::gemm_into(d, a, b, 0.0, 2.0);  // beta 0: d's NaNs unread
    EXPECT_TRUE(at::equal(d, at::mm(a, b) * 2));
  }
  at::Tensor x = at::randn({2, 3, 5}, at::kDouble).set_requires_grad(true), w = at::randn({4, 5}, at::kDouble),
             b = at::randn({4}, at::kDouble), gy = at::randn({2, 3, 4}, at::kDouble);
  at::Tensor y = kernels::frozen_linear_tuned(x, w, b), want = at::linear(x, w, b);
  EXPECT_TRUE(at::equal(y, want));
  EXPECT_TRUE(at::equal(torch::autograd::grad({y}, {x}, {gy})[0], torch::autograd::grad({want}, {x}, {gy})[0]));
  EXPECT_TRUE(at::equal(kernels::linear_values(x.detach(), w, b), want.detach()));
}

TEST(GemmTuned, OperandLayouts) {
  bool t = false;
  int64_t ld = 0;
  at::Tensor m = at::zeros({6, 10});
  ASSERT_TRUE(kernels::gemm_operand_layout(m, t, ld));
  EXPECT_FALSE(t);
  EXPECT_EQ(ld, 10);
  ASSERT_TRUE(kernels::gemm_operand_layout(m.t(), t, ld));  // [10, 6] with columns contiguous
  EXPECT_TRUE(t);
  EXPECT_EQ(ld, 10);
  ASSERT_TRUE(kernels::gemm_operand_layout(m.narrow(1, 2, 4), t, ld));  // a column slice keeps the row stride
  EXPECT_FALSE(t);
  EXPECT_EQ(ld, 10);
  ASSERT_TRUE(kernels::gemm_operand_layout(m.narrow(0, 3, 1), t, ld));  // one row: ld is its width
  EXPECT_EQ(ld, 10);
  EXPECT_FALSE(kernels::gemm_operand_layout(at::zeros({6, 10}).slice(1, 0, 10, 2), t, ld));  // no unit stride
}

TEST(GemmTuned, TuningFileKeepsOtherDevicesAndSkipsMalformedLines) {
  const std::string path = temp_path("gemm_tuning") + "/sub/gemm_tuning.txt";
  kernels::GemmAlgoWords w1{}, w2{};
  for (int i = 0; i < 8; ++i) w1[i] = 0x0123456789abcdefULL + i, w2[i] = ~uint64_t(i);
  ASSERT_TRUE(kernels::write_gemm_tuning(path, "GPU A sm90 x132 cublasLt1", {{"bf16 TN m1 n2 k3", w1}}));
  ASSERT_TRUE(kernels::write_gemm_tuning(path, "GPU B", {{"k1", w2}, {"k2", w1}}));
  ASSERT_TRUE(kernels::write_gemm_tuning(path, "GPU B", {{"k3", w2}}));  // replaces B's, keeps A's
  {
    std::ofstream app(path, std::ios::app);
    app << "GPU A sm90 x132 cublasLt1|broken|12 34\nnot a line\n";
  }
  auto a = kernels::read_gemm_tuning(path, "GPU A sm90 x132 cublasLt1");
  ASSERT_EQ(a.size(), 1u);
  EXPECT_EQ(a.at("bf16 TN m1 n2 k3"), w1);
  auto b = kernels::read_gemm_tuning(path, "GPU B");
  ASSERT_EQ(b.size(), 1u);
  EXPECT_EQ(b.at("k3"), w2);
  EXPECT_TRUE(kernels::read_gemm_tuning(path + ".missing", "GPU B").empty());
  // A path under a regular file cannot be written: false, and the file is unchanged.
  const std::string before = slurp(path);
  EXPECT_FALSE(kernels::write_gemm_tuning(path + "/x.txt", "GPU B", {{"k", w1}}));
  EXPECT_EQ(slurp(path), before);
  std::filesystem::remove_all(temp_path("gemm_tuning"));
}

#ifdef FLUXTRAIN_WITH_CUDA
namespace {

struct TuningFileScope {
  std::string path = temp_path("gemm_tuning_cuda.txt");
  TuningFileScope() {
    ::setenv("FLUXTRAIN_GEMM_TUNING_FILE", path.c_str(), 1);
    kernels::set_gemm_tuning(kernels::GemmTuning::Tune);
    kernels::reset_gemm_tuning();
  }
  ~TuningFileScope() {
    std::remove(path.c_str());
    ::unsetenv("FLUXTRAIN_GEMM_TUNING_FILE");
    kernels::reset_gemm_tuning();
  }
};

}  // namespace

TEST(GemmTuned, CudaMatchesFloat64) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  TuningFileScope scope;
  at::manual_seed(2);
  const int64_t M = 300, K = 264, N = 136;
  for (auto dt : {at::kBFloat16, at::kHalf}) {
    const double tol = dt == at::kBFloat16 ? 1e-2 : 2e-3;
    for (kernels::GemmTuning mode : {kernels::GemmTuning::Tune, kernels::GemmTuning::Heuristic}) {
      kernels::set_gemm_tuning(mode);
      for (int layout = 0; layout < 4; ++layout) {
        const bool at_ = layout & 1, bt = layout & 2;
        // a [M, K] and b [K, N], each either row-contiguous or a transposed column-contiguous one.
        at::Tensor a64 = at::randn({M, K}, at::kDouble), b64 = at::randn({K, N}, at::kDouble) / std::sqrt(double(K));
        at::Tensor a = at_ ? a64.t().contiguous().to(dt).cuda().t() : a64.to(dt).cuda();
        at::Tensor b = bt ? b64.t().contiguous().to(dt).cuda().t() : b64.to(dt).cuda();
        ASSERT_TRUE(kernels::gemm_tuned_applies(a, b));
        const at::Tensor ar = a.cpu().to(at::kDouble), br = b.cpu().to(at::kDouble);
        const std::string what = std::string(c10::toString(dt)) + " layout " + std::to_string(layout) +
                                 (mode == kernels::GemmTuning::Tune ? " tuned" : " heuristic");
        at::Tensor bias = at::randn({N}, at::kDouble).to(dt);
        EXPECT_LE(rel_err(kernels::gemm(a, b).cpu(), at::mm(ar, br)), tol) << what;
        EXPECT_LE(rel_err(kernels::gemm(a, b, bias.cuda()).cpu(), at::mm(ar, br) + bias.to(at::kDouble)), tol)
            << what << " bias";
        // Into a narrowed output (leading dimension N + 24), accumulating (beta 1) with alpha 0.5.
        at::Tensor wide = at::randn({M, N + 24}, at::kDouble).to(dt);
        at::Tensor out = wide.cuda();
        kernels::gemm_into(out.narrow(1, 8, N), a, b, 1.0, 0.5);
        at::Tensor want = wide.to(at::kDouble);
        want.narrow(1, 8, N).add_(at::mm(ar, br), 0.5);
        EXPECT_LE(rel_err(out.cpu(), want), tol) << what << " accumulated";
        EXPECT_TRUE(at::equal(out.cpu().narrow(1, 0, 8), wide.narrow(1, 0, 8))) << what << ": columns outside written";
      }
    }
  }
}

TEST(GemmTuned, CudaTuningFileGivesTheSameAlgorithmAndBits) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  TuningFileScope scope;
  at::manual_seed(3);
  at::Tensor a = at::randn({1000, 768}, at::kCUDA).to(at::kBFloat16), b = at::randn({768, 520}, at::kCUDA).to(at::kBFloat16);
  const at::Tensor first = kernels::gemm(a, b);
  EXPECT_EQ(kernels::gemm_tuning_stats().tuned, 1);
  EXPECT_NE(slurp(scope.path).find("bf16 NN m520 n1000 k768"), std::string::npos) << slurp(scope.path);
  kernels::reset_gemm_tuning();  // as a new process: the choice comes from the file
  const at::Tensor again = kernels::gemm(a, b);
  EXPECT_EQ(kernels::gemm_tuning_stats().from_file, 1);
  EXPECT_EQ(kernels::gemm_tuning_stats().tuned, 0);
  EXPECT_TRUE(at::equal(first, again));
}

TEST(GemmTuned, CudaShapeFirstMetInCaptureTakesTheHeuristicAndReplaysSameBits) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  TuningFileScope scope;
  at::manual_seed(4);
  at::Tensor a = at::randn({640, 512}, at::kCUDA).to(at::kBFloat16), b = at::randn({512, 384}, at::kCUDA).to(at::kBFloat16);
  at::Tensor out = at::empty({640, 384}, a.options());
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  at::cuda::CUDAGraph graph;
  {
    c10::cuda::CUDAStreamGuard guard(side);
    // Warm-up on the capture stream (another shape): LibTorch's handle and workspace for it exist
    // before the capture.
    kernels::gemm(a.narrow(0, 0, 64), b);
    side.synchronize();
    const int64_t tuned_before = kernels::gemm_tuning_stats().tuned;
    ASSERT_EQ(tuned_before, 1);
    graph.capture_begin();
    kernels::gemm_into(out, a, b, 0.0, 1.0);
    graph.capture_end();
  }
  EXPECT_EQ(kernels::gemm_tuning_stats().heuristic, 1);
  EXPECT_EQ(kernels::gemm_tuning_stats().tuned, 1);
  graph.replay();
  at::Tensor eager = at::empty_like(out);
  kernels::gemm_into(eager, a, b, 0.0, 1.0);  // the same plan: the same algorithm
  EXPECT_TRUE(at::equal(out, eager));
  EXPECT_EQ(kernels::gemm_tuning_stats().tuned, 1);
}

TEST(GemmTuned, CudaFrozenLinearGradientMatchesAtenLinear) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  TuningFileScope scope;
  at::manual_seed(5);
  at::Tensor x64 = at::randn({2, 96, 256}, at::kDouble), w64 = at::randn({320, 256}, at::kDouble) / 16,
             b64 = at::randn({320}, at::kDouble), g64 = at::randn({2, 96, 320}, at::kDouble);
  at::Tensor x = x64.to(at::kBFloat16).cuda().set_requires_grad(true);
  at::Tensor y = kernels::frozen_linear_tuned(x, w64.to(at::kBFloat16).cuda(), b64.to(at::kBFloat16).cuda());
  at::Tensor dx = torch::autograd::grad({y}, {x}, {g64.to(at::kBFloat16).cuda()})[0];
  at::Tensor xr = x.detach().cpu().to(at::kDouble).set_requires_grad(true);
  at::Tensor yr = at::linear(xr, w64.to(at::kBFloat16).to(at::kDouble), b64.to(at::kBFloat16).to(at::kDouble));
  at::Tensor dxr = torch::autograd::grad({yr}, {xr}, {g64.to(at::kBFloat16).to(at::kDouble)})[0];
  EXPECT_LE(rel_err(y.cpu(), yr), 1e-2);
  EXPECT_LE(rel_err(dx.cpu(), dxr), 1e-2);
  EXPECT_GT(kernels::gemm_tuning_stats().tuned, 0);  // the node took the tuned path
}
#endif
