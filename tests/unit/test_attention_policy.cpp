// The attention backend policy (FLUXTRAIN_SDP_CUDNN, src/model/blocks.cpp): every policy must give
// the same attention, forward and backward. On the GPU each policy's bf16 result is checked
// against a naive float64 softmax(q k^T / sqrt(D)) v computed on the CPU from the same bf16
// inputs, with gradients by float64 autograd of that formula. The CPU build has no policy to
// choose (SDPA's math path), so the test runs on CUDA only.
#include <gtest/gtest.h>
#include <cmath>
#include <cstdlib>
#include <string>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include "model/blocks.h"

namespace {
using fluxtrain::configure_attention_backends;
using fluxtrain::split_attention;

// Naive attention on [B, h, L, D] operands, merged to [B, L, h*D] like split_attention returns.
at::Tensor naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  at::Tensor s = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(q.size(-1)));
  at::Tensor o = at::matmul(at::softmax(s, -1), v);
  return o.transpose(1, 2).reshape({q.size(0), q.size(2), q.size(1) * q.size(3)});
}

// max |got - want| / max |want|
double scaled_error(const at::Tensor& got, const at::Tensor& want) {
  at::Tensor g = got.detach().cpu().to(at::kDouble), w = want.detach().to(at::kDouble);
  return (g - w).abs().max().item<double>() / w.abs().max().item<double>();
}

}  // namespace

// Tolerance (bf16 operands, float32 accumulation in every backend; the backends round the
// softmax probabilities to bf16 before the PV product): 1e-2 of the largest magnitude for the
// output, 2e-2 for the gradients (two such products deep).
TEST(AttentionPolicy, EveryPolicyMatchesNaiveFloat64OnCuda) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const char* saved = std::getenv("FLUXTRAIN_SDP_CUDNN");
  const std::string restore = saved ? saved : "";
  at::manual_seed(5);
  // Equal lengths (self-attention, plain-LoRA mode's calls: 1536 = 512 px; 300 is not a multiple
  // of 64) and a cross-length call (EasyControl's main call).
  struct Case {
    int64_t Lq, Lk;
  };
  for (Case c : {Case{1536, 1536}, Case{300, 300}, Case{512, 768}}) {
    const int64_t B = 1, h = 4, D = 128;
    at::Tensor q = at::randn({B, h, c.Lq, D}).to(at::kBFloat16), k = at::randn({B, h, c.Lk, D}).to(at::kBFloat16),
               v = at::randn({B, h, c.Lk, D}).to(at::kBFloat16), dy = at::randn({B, c.Lq, h * D}).to(at::kBFloat16);
    at::Tensor qd = q.to(at::kDouble).requires_grad_(), kd = k.to(at::kDouble).requires_grad_(),
               vd = v.to(at::kDouble).requires_grad_();
    at::Tensor want = naive_attention(qd, kd, vd);
    auto want_g = torch::autograd::grad({want}, {qd, kd, vd}, {dy.to(at::kDouble)});
    for (const char* policy : {"auto", "1", "0"}) {
      setenv("FLUXTRAIN_SDP_CUDNN", policy, 1);
      configure_attention_backends();
      const std::string what = std::string(policy) + " Lq" + std::to_string(c.Lq) + " Lk" + std::to_string(c.Lk);
      at::Tensor qc = q.cuda().requires_grad_(), kc = k.cuda().requires_grad_(), vc = v.cuda().requires_grad_();
      at::Tensor got = split_attention(qc, kc, vc, {}, {}, {}, {}, nullptr);
      ASSERT_EQ(got.sizes(), want.sizes()) << what;
      EXPECT_LT(scaled_error(got, want), 1e-2) << what;
      auto g = torch::autograd::grad({got}, {qc, kc, vc}, {dy.cuda()});
      const char* names[] = {" dq", " dk", " dv"};
      for (int i = 0; i < 3; ++i) EXPECT_LT(scaled_error(g[i], want_g[i]), 2e-2) << what << names[i];
    }
  }
  // Calls of one shape whose output gradients come back with different strides (a slice of a
  // wider tensor, as behind a cat, then a dense one): LibTorch's cuDNN attention caches one
  // backward graph per q/k/v shape and stride and used to read the second gradient with the
  // first one's strides (src/model/blocks.cpp, sdpa).
  for (const char* policy : {"1", "auto"}) {
    setenv("FLUXTRAIN_SDP_CUDNN", policy, 1);
    configure_attention_backends();
    const int64_t B = 1, h = 4, L = 640, D = 128;
    at::Tensor q = at::randn({B, h, L, D}).to(at::kBFloat16), k = at::randn({B, h, L, D}).to(at::kBFloat16),
               v = at::randn({B, h, L, D}).to(at::kBFloat16);
    at::Tensor qd = q.to(at::kDouble).requires_grad_(), kd = k.to(at::kDouble).requires_grad_(),
               vd = v.to(at::kDouble).requires_grad_();
    at::Tensor want = naive_attention(qd, kd, vd);
    for (int64_t width : {5 * h * D, h * D}) {
      const std::string what = std::string(policy) + " gradient row stride " + std::to_string(width);
      at::Tensor wide = at::randn({B, L, width}).to(at::kBFloat16);
      at::Tensor dy = wide.narrow(2, 0, h * D);  // a slice when width > h*D
      auto want_g = torch::autograd::grad({want}, {qd, kd, vd}, {dy.to(at::kDouble)}, /*retain_graph=*/true);
      at::Tensor qc = q.cuda().requires_grad_(), kc = k.cuda().requires_grad_(), vc = v.cuda().requires_grad_();
      at::Tensor got = split_attention(qc, kc, vc, {}, {}, {}, {}, nullptr);
      auto g = torch::autograd::grad({got}, {qc, kc, vc}, {wide.cuda().narrow(2, 0, h * D)});
      const char* names[] = {" dq", " dk", " dv"};
      for (int i = 0; i < 3; ++i) EXPECT_LT(scaled_error(g[i], want_g[i]), 2e-2) << what << names[i];
    }
  }
  if (saved)
    setenv("FLUXTRAIN_SDP_CUDNN", restore.c_str(), 1);
  else
    unsetenv("FLUXTRAIN_SDP_CUDNN");
  configure_attention_backends();
}
