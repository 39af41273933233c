// Selective recomputation (src/model/recompute.h) against what it replaces: a replayed attention
// call against at::scaled_dot_product_attention differentiated by autograd. The uncomputed linear
// of a replay is GeluLinear.* (test_gelu_linear.cpp); the model-level check (checkpointed vs plain
// gradients) is Gradients.Checkpointing* in test_model.cpp.
#include <gtest/gtest.h>

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/csrc/autograd/autograd.h>

#include "model/model_options.h"
#include "model/recompute.h"

using namespace fluxtrain;

namespace {

double rel_err(const at::Tensor& got, const at::Tensor& want) {
  at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  return (g - w).abs().max().item<double>() / std::max(w.abs().max().item<double>(), 1e-300);
}

at::Tensor leaf(const at::Tensor& t) { return t.detach().clone().set_requires_grad(true); }

// at::scaled_dot_product_attention on leaf copies of q, k, v, differentiated by autograd with g.
std::pair<at::Tensor, std::vector<at::Tensor>> sdpa_autograd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& g) {
  at::Tensor q0 = leaf(q), k0 = leaf(k), v0 = leaf(v);
  at::Tensor out = at::scaled_dot_product_attention(q0, k0, v0);
  return {out, torch::autograd::grad({out}, {q0, k0, v0}, {g})};
}

// One attention call recorded into tape (no grad), then replayed on leaf copies of q, k, v.
struct Replayed {
  at::Tensor recorded, out;       // the record phase's and the replay's outputs
  bool replaying_inside = false;  // replaying_recompute() within the replay scope
  std::vector<at::Tensor> q_k_v;  // the replay's leaves
};
Replayed record_and_replay(RecomputeTape& tape, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  Replayed r;
  {
    at::NoGradGuard ng;
    RecomputeScope rec(&tape, RecomputeTape::Phase::Record);
    r.recorded = recorded_attention(q, k, v, nullptr);
  }
  r.q_k_v = {leaf(q), leaf(k), leaf(v)};
  RecomputeScope rep(&tape, RecomputeTape::Phase::Replay);
  r.replaying_inside = replaying_recompute();
  r.out = recorded_attention(r.q_k_v[0], r.q_k_v[1], r.q_k_v[2], nullptr);
  return r;
}

// Cross lengths (queries 7, keys 11) like the main stream's call; float32 takes LibTorch's CPU
// flash attention, the backend whose saved form the CPU path records.
TEST(Recompute, ReplayedAttentionMatchesAutogradThroughSdpa) {
  at::manual_seed(1);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor q = at::randn({2, 3, 7, 16}, f32), k = at::randn({2, 3, 11, 16}, f32), v = at::randn({2, 3, 11, 16}, f32);
  at::Tensor g = at::randn({2, 3, 7, 16}, f32);
  const auto [want, dwant] = sdpa_autograd(q, k, v, g);

  RecomputeTape tape;
  const Replayed r = record_and_replay(tape, q, k, v);
  ASSERT_TRUE(r.recorded.defined());
  ASSERT_EQ(tape.attention.size(), 1u);
  EXPECT_EQ(tape.attention[0].backend, SavedAttention::Backend::FlashCpu);
  EXPECT_TRUE(r.replaying_inside);
  EXPECT_FALSE(replaying_recompute());
  const at::Tensor& got = r.out;
  ASSERT_TRUE(got.requires_grad());
  auto dgot = torch::autograd::grad({got}, r.q_k_v, {g});
  const at::Tensor &k1 = r.q_k_v[1], &v1 = r.q_k_v[2];
  // Same backend forward and backward as SDPA's own: equal to float32 rounding.
  EXPECT_LT(rel_err(got, want), 1e-6);
  for (int i = 0; i < 3; ++i) EXPECT_LT(rel_err(dgot[i], dwant[i]), 1e-5) << i;

  // A replay that does not match the record is an internal error, not a wrong gradient.
  RecomputeScope rep(&tape, RecomputeTape::Phase::Replay);
  EXPECT_THROW(recorded_attention(leaf(k), k1, v1, nullptr), c10::Error);
}

TEST(Recompute, CheckpointAttentionFlagResolves) {
  EXPECT_TRUE(checkpoint_attention_enabled("auto", false));
  EXPECT_FALSE(checkpoint_attention_enabled("auto", true)) << "low-memory runs keep memory";
  EXPECT_TRUE(checkpoint_attention_enabled("on", true));
  EXPECT_FALSE(checkpoint_attention_enabled("off", false));
  // Off, a checkpointed block records nothing and every call is recomputed.
  set_checkpoint_attention(false);
  RecomputeTape tape;
  {
    at::NoGradGuard ng;
    RecomputeScope rec(&tape, RecomputeTape::Phase::Record);
    at::Tensor q = at::randn({1, 2, 3, 8});
    EXPECT_FALSE(recorded_attention(q, q, q, nullptr).defined());
  }
  EXPECT_TRUE(tape.attention.empty());
  set_checkpoint_attention(true);
}

// The CUDA backends' saved forms (cuDNN by default, flash attention with cuDNN off), in bf16 at
// FLUX's head size, with the main stream's cross lengths and a condition's equal lengths, and an
// output gradient in the merged-heads layout the model hands them.
TEST(Recompute, ReplayedAttentionOnCudaMatchesSdpa) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  for (bool cudnn : {true, false}) {
    at::globalContext().setSDPUseCuDNN(cudnn);
    for (auto [lq, lk] : {std::pair<int64_t, int64_t>{300, 428}, {256, 256}}) {
      at::manual_seed(3);
      at::Tensor q = at::randn({1, 24, lq, 128}, opt), k = at::randn({1, 24, lk, 128}, opt),
                 v = at::randn({1, 24, lk, 128}, opt);
      at::Tensor g = at::randn({1, lq, 24, 128}, opt).transpose(1, 2);  // merged-heads layout
      const auto [want, dwant] = sdpa_autograd(q, k, v, g);
      RecomputeTape tape;
      const Replayed r = record_and_replay(tape, q, k, v);
      ASSERT_EQ(tape.attention.size(), 1u);
      EXPECT_EQ(tape.attention[0].backend,
                cudnn ? SavedAttention::Backend::CudnnCuda : SavedAttention::Backend::FlashCuda);
      const at::Tensor& got = r.out;
      auto dgot = torch::autograd::grad({got}, r.q_k_v, {g});
      // Same backend both ways; bf16 rounding of the outputs allows 1e-2 of the largest magnitude.
      EXPECT_LT(rel_err(got, want), 1e-2) << cudnn << " " << lq;
      for (int i = 0; i < 3; ++i) EXPECT_LT(rel_err(dgot[i], dwant[i]), 1e-2) << cudnn << " " << lq << " " << i;
    }
  }
  at::globalContext().setSDPUseCuDNN(true);
}

}  // namespace
