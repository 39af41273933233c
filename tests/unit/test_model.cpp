// The transformer against independent references: float64 naive blocks, dense-mask attention,
// finite differences; LoRA scoping; activation checkpointing; position ids.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "core/error.h"
#include "core/safetensors.h"
#include "model/blocks.h"
#include "model/flux_transformer.h"
#include "model/flux_weights.h"
#include "model/layers.h"
#include "model/position_ids.h"
#include "model/recompute.h"
#include "model/rope.h"
#include "support/flux_reference.h"
#include "support/test_util.h"

using namespace fluxtrain;

namespace {

const auto kF64 = at::TensorOptions().dtype(at::kDouble);

FluxConfig tiny() { return FluxConfig::preset("tiny"); }

// A LoRA set with non-zero up weights so that adapters have an effect.
// Condition n gets rank 4 + n and alpha 2 + n/2, so that every condition's scale differs.
LoraSet random_lora(const FluxConfig& cfg, int lora_num, uint64_t seed) {
  LoraConfig lc;
  lc.lora_num = lora_num;
  lc.ranks.clear();
  lc.alphas.clear();
  for (int n = 0; n < lora_num; ++n) {
    lc.ranks.push_back(4 + n);
    lc.alphas.push_back(2.0 + 0.5 * n);
  }
  LoraSet s = LoraSet::create(cfg, lc, seed, at::kDouble);
  at::manual_seed(seed);
  for (auto& a : s.adapters()) {
    at::NoGradGuard ng;
    a.up.copy_(at::randn(a.up.sizes(), kF64) * 0.3);
  }
  return s;
}

struct Case {
  FluxInputs in;
  std::vector<int64_t> cond_grid;  // per condition: side of its square grid
};

// Inputs of a tiny model: noise grid nh x nh, conditions with the given grid sides.
FluxInputs make_inputs(const FluxConfig& cfg, int64_t B, int64_t nh, std::vector<int64_t> cond_sides, uint64_t seed,
                       int64_t T = 5) {
  at::manual_seed(seed);
  FluxInputs in;
  in.img = at::randn({B, nh * nh, cfg.in_channels}, kF64);
  in.img_ids = noise_position_ids(nh, nh);
  in.txt = at::randn({B, T, cfg.context_in_dim}, kF64);
  in.txt_ids = text_position_ids(T);
  in.y = at::randn({B, cfg.vec_in_dim}, kF64);
  in.timesteps = at::rand({B}, kF64);
  in.guidance = at::full({B}, 1.0, kF64);
  for (size_t n = 0; n < cond_sides.size(); ++n) {
    const int64_t c = cond_sides[n];
    in.cond.push_back(at::randn({B, c * c, cfg.in_channels}, kF64));
    in.cond_ids.push_back(n % 2 == 0 ? subject_position_ids(c, c) : spatial_position_ids(c, c, nh, nh));
  }
  return in;
}

TensorMap block_map(const TensorMap& full, const std::string& prefix) {
  TensorMap m;
  for (const auto& kv : full)
    if (kv.first.rfind(prefix, 0) == 0) m.emplace(kv.first.substr(prefix.size()), kv.second);
  return m;
}

// Runs our double block and the reference on random stream activations.
// B = 1 with one condition takes the single block's merged qkv GEMM (blocks.cpp, joint_qkv).
void compare_blocks(std::vector<int64_t> cond_lens, int lora_num, uint64_t seed, int64_t B = 2) {
  const FluxConfig cfg = tiny();
  const TensorMap w = init_random_weights(cfg, seed, at::kDouble);
  LoraSet lora = random_lora(cfg, lora_num, seed + 1);
  const int64_t T = 4, L = 9, H = cfg.hidden_size;
  at::manual_seed(seed + 2);
  at::Tensor img = at::randn({B, L, H}, kF64), txt = at::randn({B, T, H}, kF64);
  at::Tensor vec = at::randn({B, H}, kF64), vec_cond = at::randn({B, H}, kF64);
  std::vector<at::Tensor> conds;
  std::vector<at::Tensor> cond_ids;
  for (size_t n = 0; n < cond_lens.size(); ++n) {
    conds.push_back(at::randn({B, cond_lens[n], H}, kF64));
    cond_ids.push_back(at::rand({cond_lens[n], 3}, kF64) * 20);
  }
  at::Tensor main_ids = at::cat({text_position_ids(T), noise_position_ids(3, 3)}, 0);

  BlockContext ctx;
  ctx.cfg = &cfg;
  ctx.lora = &lora;
  ctx.cond_lens = cond_lens;
  ctx.rope_main = rope_from_ids(main_ids, cfg.axes_dim, cfg.theta, at::kDouble);
  at::Tensor cond_all;
  if (!conds.empty()) {
    ctx.rope_cond = rope_from_ids(at::cat(cond_ids, 0), cfg.axes_dim, cfg.theta, at::kDouble);
    cond_all = at::cat(conds, 1);
  }
  at::Tensor all_ids = conds.empty() ? main_ids : at::cat({main_ids, at::cat(cond_ids, 0)}, 0);

  // Double block 1 (global index 1).
  ctx.block = 1;
  auto ours = double_block(ctx, block_map(w, "double_blocks.1."), img, txt, cond_all, vec, vec_cond);
  // The reference reads the LoRA as EasyControl saves it (its key names, alphas, lora_weights 1).
  ref::EasyControlLora ec{lora.state(), lora.config().alphas, std::vector<double>(lora_num, 1.0)};
  ref::RefInputs ri{img, txt, conds, vec, vec_cond, all_ids};
  auto theirs = ref::double_block(cfg, block_map(w, "double_blocks.1."), &ec, 1, ri);
  EXPECT_LT(rel_err(ours[0], theirs[0]), 1e-10) << "img";
  EXPECT_LT(rel_err(ours[1], theirs[1]), 1e-10) << "txt";
  if (!conds.empty()) {
    std::vector<at::Tensor> rc(theirs.begin() + 2, theirs.end());
    EXPECT_LT(rel_err(ours[2], at::cat(rc, 1)), 1e-10) << "cond";
  }

  // Single block 0 (global index depth + 0), not the last one.
  const int sb = static_cast<int>(cfg.depth);
  ctx.block = sb;
  ctx.last_block = false;
  at::Tensor x = at::cat({txt, img}, 1);
  auto ours_s = single_block(ctx, block_map(w, "single_blocks.0."), x, cond_all, vec, vec_cond);
  auto theirs_s = ref::single_block(cfg, block_map(w, "single_blocks.0."), &ec, 0, x, conds, vec, vec_cond, all_ids);
  EXPECT_LT(rel_err(ours_s[0], theirs_s[0]), 1e-10) << "x";
  if (!conds.empty()) {
    std::vector<at::Tensor> rc(theirs_s.begin() + 1, theirs_s.end());
    EXPECT_LT(rel_err(ours_s[1], at::cat(rc, 1)), 1e-10) << "cond";
  }
}

double loss_of(const at::Tensor& out, const at::Tensor& r) { return (out * r).sum().item<double>(); }

// Central differences (float64, eps 1e-6) of loss_of(forward, r) at three entries of each given
// adapter's down and up, against the gradients already in .grad(); 1e-6 relative. Returns the count.
int check_finite_differences(const FluxConfig& cfg, BlockWeights& w, LoraSet& lora, const FluxInputs& in,
                             const at::Tensor& r, const std::vector<LoraAdapter*>& adapters) {
  int checked = 0;
  for (LoraAdapter* a : adapters) {
    for (at::Tensor* p : {&a->down, &a->up}) {
      EXPECT_TRUE(p->grad().defined()) << a->key;
      if (!p->grad().defined()) continue;
      for (int64_t idx : {int64_t(0), p->numel() / 3, p->numel() - 1}) {
        const double eps = 1e-6;
        at::Tensor flat = p->view({-1});
        const double orig = flat[idx].item<double>();
        double lp, lm;
        {
          at::NoGradGuard ng;
          flat[idx] = orig + eps;
          lp = loss_of(flux_forward(cfg, w, &lora, in), r);
          flat[idx] = orig - eps;
          lm = loss_of(flux_forward(cfg, w, &lora, in), r);
          flat[idx] = orig;
        }
        const double fd = (lp - lm) / (2 * eps);
        const double an = p->grad().view({-1})[idx].item<double>();
        EXPECT_NEAR(an, fd, 1e-6 * std::max(1.0, std::abs(fd))) << a->key << " [" << idx << "]";
        ++checked;
      }
    }
  }
  return checked;
}

}  // namespace

// --- blocks vs the naive float64 reference (tolerance 1e-10 relative) -------------------
TEST(ModelReference, BlocksWithoutConditions) { compare_blocks({}, 1, 10); }
TEST(ModelReference, BlocksWithOneCondition) { compare_blocks({6}, 1, 11); }
TEST(ModelReference, BlocksWithOneConditionAtBatchOne) { compare_blocks({6}, 1, 14, 1); }
TEST(ModelReference, BlocksWithTwoEqualConditions) { compare_blocks({4, 4}, 2, 12); }
TEST(ModelReference, BlocksWithUnequalConditions) { compare_blocks({4, 7, 3}, 3, 13); }

// --- split attention == dense-mask attention ----------------------------------------------
TEST(SplitAttention, EqualsDenseMaskAttention) {
  for (auto lens : std::vector<std::vector<int64_t>>{{}, {5}, {3, 3}, {2, 6, 4}, {7, 7, 7, 7}}) {
    at::manual_seed(static_cast<uint64_t>(lens.size()) * 7 + 1);
    const int64_t B = 2, h = 3, D = 8, Lm = 11;
    int64_t Lc = 0;
    for (auto l : lens) Lc += l;
    at::Tensor q = at::randn({B, h, Lm + Lc, D}, kF64), k = at::randn({B, h, Lm + Lc, D}, kF64),
               v = at::randn({B, h, Lm + Lc, D}, kF64);
    at::Tensor oc;
    auto part = [&](const at::Tensor& t, bool cond) {
      return cond ? (Lc ? t.narrow(2, Lm, Lc) : at::Tensor()) : t.narrow(2, 0, Lm);
    };
    at::Tensor om = split_attention(part(q, false), part(k, false), part(v, false), part(q, true), part(k, true),
                                    part(v, true), lens, &oc);
    at::Tensor dense = ref::masked_attention(q, k, v, ref::easycontrol_mask(Lm, lens));
    dense = dense.transpose(1, 2).flatten(2);
    EXPECT_LT(rel_err(om, dense.narrow(1, 0, Lm)), 1e-12) << lens.size();
    if (Lc) {
      EXPECT_LT(rel_err(oc, dense.narrow(1, Lm, Lc)), 1e-12) << lens.size();
    }
  }
}

// --- LoRA scoping ------------------------------------------------------------------------
TEST(LoraScope, ZeroUpGivesTheBaseModelExactly) {
  const FluxConfig cfg = tiny();
  ResidentBlockWeights w(init_random_weights(cfg, 3, at::kDouble), cfg.depth, cfg.depth_single);
  LoraConfig lc;
  lc.lora_num = 2;
  lc.ranks = {4, 8};
  lc.alphas = {4, 4};
  LoraSet lora = LoraSet::create(cfg, lc, 5, at::kDouble);  // up = 0 at init
  FluxInputs in = make_inputs(cfg, 1, 4, {3, 3}, 7);
  at::NoGradGuard ng;
  at::Tensor base = flux_forward(cfg, w, nullptr, in);
  at::Tensor with = flux_forward(cfg, w, &lora, in);
  EXPECT_TRUE(at::equal(base, with));
}

TEST(LoraScope, NonZeroLoraWithoutConditionTokensChangesNothing) {
  const FluxConfig cfg = tiny();
  ResidentBlockWeights w(init_random_weights(cfg, 3, at::kDouble), cfg.depth, cfg.depth_single);
  LoraSet lora = random_lora(cfg, 1, 9);
  FluxInputs in = make_inputs(cfg, 2, 4, {}, 8);
  at::NoGradGuard ng;
  EXPECT_TRUE(at::equal(flux_forward(cfg, w, nullptr, in), flux_forward(cfg, w, &lora, in)));
  // ...while with condition tokens the same LoRA does change the output (the test can fail).
  FluxInputs inc = make_inputs(cfg, 2, 4, {3}, 8);
  EXPECT_GT(rel_err(flux_forward(cfg, w, nullptr, inc), flux_forward(cfg, w, &lora, inc)), 1e-6);
}

TEST(LoraScope, EachConditionDependsOnlyOnItsOwnTokens) {
  const FluxConfig cfg = tiny();
  const TensorMap full = init_random_weights(cfg, 4, at::kDouble);
  LoraSet lora = random_lora(cfg, 2, 10);
  for (bool equal_sizes : {true, false}) {
    const int64_t B = 1, T = 3, L = 4, H = cfg.hidden_size, l0 = 4, l1 = equal_sizes ? 4 : 6;
    at::manual_seed(21);
    at::Tensor img = at::randn({B, L, H}, kF64), txt = at::randn({B, T, H}, kF64), vec = at::randn({B, H}, kF64),
               vc = at::randn({B, H}, kF64);
    at::Tensor c0 = at::randn({B, l0, H}, kF64), c1 = at::randn({B, l1, H}, kF64);
    BlockContext ctx;
    ctx.cfg = &cfg;
    ctx.lora = &lora;
    ctx.cond_lens = {l0, l1};
    ctx.rope_main = rope_from_ids(at::rand({T + L, 3}, kF64), cfg.axes_dim, cfg.theta, at::kDouble);
    ctx.rope_cond = rope_from_ids(at::rand({l0 + l1, 3}, kF64), cfg.axes_dim, cfg.theta, at::kDouble);
    ctx.block = 0;
    TensorMap wd = block_map(full, "double_blocks.0."), ws = block_map(full, "single_blocks.0.");
    auto a = double_block(ctx, wd, img, txt, at::cat({c0, c1}, 1), vec, vc);
    auto b = double_block(ctx, wd, img, txt, at::cat({c0, c1 + 1.0}, 1), vec, vc);
    EXPECT_TRUE(at::equal(a[2].narrow(1, 0, l0), b[2].narrow(1, 0, l0))) << "double, cond 0";
    EXPECT_FALSE(at::equal(a[2].narrow(1, l0, l1), b[2].narrow(1, l0, l1)));
    EXPECT_FALSE(at::equal(a[0], b[0])) << "noise tokens see the conditions";
    ctx.block = static_cast<int>(cfg.depth);
    at::Tensor x = at::cat({txt, img}, 1);
    auto sa = single_block(ctx, ws, x, at::cat({c0, c1}, 1), vec, vc);
    auto sb = single_block(ctx, ws, x, at::cat({c0 + 1.0, c1}, 1), vec, vc);
    EXPECT_TRUE(at::equal(sa[1].narrow(1, l0, l1), sb[1].narrow(1, l0, l1))) << "single, cond 1";
  }
}

// --- gradients ------------------------------------------------------------------------------
// Batch 1: with one condition the single blocks run main and condition rows through one qkv GEMM
// (blocks.cpp, joint_qkv), with two through one per stream.
void gradients_match_finite_differences(std::vector<int64_t> cond_sides) {
  const FluxConfig cfg = tiny();
  ResidentBlockWeights w(init_random_weights(cfg, 6, at::kDouble), cfg.depth, cfg.depth_single);
  LoraSet lora = random_lora(cfg, static_cast<int>(cond_sides.size()), 11);
  FluxInputs in = make_inputs(cfg, 1, 3, cond_sides, 12);
  at::manual_seed(13);
  at::Tensor r = at::randn({1, 9, cfg.out_channels}, kF64);
  at::Tensor out = flux_forward(cfg, w, &lora, in);
  (out * r).sum().backward();
  for (const auto& kv : w.globals()) EXPECT_FALSE(kv.second.requires_grad()) << kv.first;
  for (int i = 0; i < w.num_blocks(); ++i)
    for (const auto& kv : w.acquire(i)) EXPECT_FALSE(kv.second.grad().defined()) << kv.first;
  // Central differences on a few entries of several adapters (down and up), float64.
  std::vector<LoraAdapter*> some;
  for (size_t ai = 0; ai < lora.adapters().size(); ai += 5) some.push_back(&lora.adapters()[ai]);
  const int checked = check_finite_differences(cfg, w, lora, in, r, some);
  EXPECT_GT(checked, 10);
}

TEST(Gradients, ReachOnlyLoraAndMatchFiniteDifferences) { gradients_match_finite_differences({2, 2}); }
TEST(Gradients, OneConditionMatchesFiniteDifferences) { gradients_match_finite_differences({2}); }

// Checkpointed vs plain gradients of the same model and inputs. dt: the model's dtype; y_grad: the
// pooled vector needs a gradient, so that every gate does and the recomputation may skip no
// linear (model/recompute.h). Returns the recompute statistics' increase.
RecomputeStats checkpoint_equivalence(at::ScalarType dt, bool y_grad, double tol, int64_t B = 2,
                                      std::vector<int64_t> cond_sides = {3, 2}) {
  const FluxConfig cfg = tiny();
  ResidentBlockWeights w(init_random_weights(cfg, 7, dt), cfg.depth, cfg.depth_single);
  FluxInputs in = make_inputs(cfg, B, 4, cond_sides, 14);
  const int lora_num = static_cast<int>(cond_sides.size());
  for (at::Tensor* t : {&in.img, &in.txt, &in.y, &in.timesteps, &in.guidance}) *t = t->to(dt);
  for (auto& c : in.cond) c = c.to(dt);
  in.txt.set_requires_grad(true);  // gradients w.r.t. the conditioning too (text-encoder training)
  in.y.set_requires_grad(y_grad);
  at::manual_seed(15);
  at::Tensor r = at::randn({B, 16, cfg.out_channels}, kF64).to(dt);
  std::vector<std::vector<at::Tensor>> grads;
  std::vector<at::Tensor> outs, txt_grads, y_grads;
  const RecomputeStats before = recompute_stats();
  for (bool ckpt : {false, true}) {
    LoraSet lora = random_lora(cfg, lora_num, 16);
    if (dt != at::kDouble) {  // the same adapters with masters in dt
      LoraSet l = LoraSet::create(cfg, lora.config(), 16, dt);
      at::NoGradGuard ng;
      const auto src = lora.parameters(), dst = l.parameters();
      for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
      lora = std::move(l);
    }
    for (at::Tensor* t : {&in.txt, &in.y})
      if (t->grad().defined()) t->mutable_grad().reset();
    ForwardOptions o;
    o.gradient_checkpointing = ckpt;
    at::Tensor out = flux_forward(cfg, w, &lora, in, o);
    (out * r).sum().backward();
    outs.push_back(out.detach());
    txt_grads.push_back(in.txt.grad().clone());
    if (y_grad) y_grads.push_back(in.y.grad().clone());
    std::vector<at::Tensor> g;
    for (const auto& p : lora.parameters()) g.push_back(p.grad().clone());
    grads.push_back(g);
  }
  const RecomputeStats after = recompute_stats();
  EXPECT_TRUE(at::equal(outs[0], outs[1]));
  // The recomputation repeats the same operations in the same order, or replays their recorded
  // results, or skips values nothing reads: gradients are expected to be equal up to reassociation
  // in accumulation (float64: 1e-13) or the attention backend's own backward (float32: its flash
  // kernel's blocked sums against the math backend's).
  EXPECT_EQ(grads[0].size(), grads[1].size());
  for (size_t i = 0; i < grads[0].size() && i < grads[1].size(); ++i)
    EXPECT_LT(rel_err(grads[1][i], grads[0][i]), tol) << i;
  EXPECT_LT(rel_err(txt_grads[1], txt_grads[0]), tol);
  if (y_grad) EXPECT_LT(rel_err(y_grads[1], y_grads[0]), tol);
  return {after.attention_replayed - before.attention_replayed, after.linears_skipped - before.linears_skipped};
}

TEST(Gradients, CheckpointingGivesIdenticalGradients) {
  const RecomputeStats s = checkpoint_equivalence(at::kDouble, false, 1e-13);
  EXPECT_GT(s.linears_skipped, 0) << "the MLP/linear2 outputs are not recomputed";
  // Batch 1, one condition: the single blocks' merged qkv GEMM with its adapter row range.
  const RecomputeStats s1 = checkpoint_equivalence(at::kDouble, false, 1e-13, 1, {3});
  EXPECT_GT(s1.linears_skipped, 0);
}

// float32 takes LibTorch's CPU flash attention, whose recorded output and log-sum-exp the
// recomputation replays; the pooled vector's gradient makes every gate need one, so no linear is
// skipped and the full recomputation path is compared too.
TEST(Gradients, CheckpointingReplaysAttentionInFloat32) {
  const RecomputeStats s = checkpoint_equivalence(at::kFloat, false, 1e-4);
  EXPECT_GT(s.attention_replayed, 0);
  EXPECT_GT(s.linears_skipped, 0);
  const RecomputeStats t = checkpoint_equivalence(at::kFloat, true, 1e-4);
  EXPECT_GT(t.attention_replayed, 0);
  EXPECT_EQ(t.linears_skipped, 0) << "gates that need a gradient need the linear's value";
}

// --- position ids --------------------------------------------------------------------------
// gated_residual (model/layers.h) against at::addcmul differentiated by autograd, float64, every
// input wanting a gradient (the gate's is a sum over tokens): 1e-14.
TEST(CustomBackward, GatedResidualMatchesAddcmul) {
  at::manual_seed(21);
  at::Tensor r = at::randn({2, 5, 8}, kF64), g = at::randn({2, 1, 8}, kF64), y = at::randn({2, 5, 8}, kF64);
  at::Tensor d = at::randn({2, 5, 8}, kF64);
  std::vector<at::Tensor> a{r.clone().requires_grad_(), g.clone().requires_grad_(), y.clone().requires_grad_()};
  std::vector<at::Tensor> b{r.clone().requires_grad_(), g.clone().requires_grad_(), y.clone().requires_grad_()};
  at::Tensor want = at::addcmul(a[0], a[1], a[2]), got = gated_residual(b[0], b[1], b[2]);
  EXPECT_LT(rel_err(got, want), 1e-14);
  auto wg = torch::autograd::grad({want}, a, {d});
  auto gg = torch::autograd::grad({got}, b, {d});
  for (int i = 0; i < 3; ++i) EXPECT_LT(rel_err(gg[i], wg[i]), 1e-14) << i;
  // The gate frozen (LoRA training): no gradient for it, the others unchanged.
  at::Tensor r2 = r.clone().requires_grad_(), y2 = y.clone().requires_grad_();
  auto g2 = torch::autograd::grad({gated_residual(r2, g, y2)}, {r2, y2}, {d});
  EXPECT_LT(rel_err(g2[0], wg[0]), 1e-14);
  EXPECT_LT(rel_err(g2[1], wg[2]), 1e-14);
}

TEST(PositionIds, MatchHandComputedTables) {
  at::Tensor n = noise_position_ids(2, 3);
  at::Tensor expect_n = at::tensor(std::vector<double>{0, 0, 0, 0, 0, 1, 0, 0, 2, 0, 1, 0, 0, 1, 1, 0, 1, 2}, kF64).view({6, 3});
  EXPECT_TRUE(at::equal(n, expect_n));
  at::Tensor s = subject_position_ids(2, 2);
  at::Tensor expect_s = at::tensor(std::vector<double>{0, 64, 0, 0, 64, 1, 0, 65, 0, 0, 65, 1}, kF64).view({4, 3});
  EXPECT_TRUE(at::equal(s, expect_s));
  // 2x2 condition stretched onto a 3x4 noise grid: rows * 3/2, cols * 4/2.
  at::Tensor p = spatial_position_ids(2, 2, 3, 4);
  at::Tensor expect_p = at::tensor(std::vector<double>{0, 0, 0, 0, 0, 2, 0, 1.5, 0, 0, 1.5, 2}, kF64).view({4, 3});
  EXPECT_TRUE(at::equal(p, expect_p));
  EXPECT_TRUE(at::equal(text_position_ids(2), at::zeros({2, 3}, kF64)));
}

// --- hand-written backward functions vs plain autograd (float64) ------------------------------
TEST(CustomBackward, RopeAndRmsNormMatchPlainAutograd) {
  at::manual_seed(30);
  const std::vector<int64_t> axes{4, 6, 6};
  Rope r = rope_from_ids(at::rand({7, 3}, kF64) * 30, axes, 10000.0, at::kDouble);
  at::Tensor x = at::randn({2, 3, 7, 16}, kF64).set_requires_grad(true);
  at::Tensor s = (at::rand({16}, kF64) + 0.5).set_requires_grad(true);
  at::Tensor g = at::randn({2, 3, 7, 16}, kF64);
  auto grads_of = [&](const at::Tensor& y) {
    return torch::autograd::grad({y}, {x, s}, {g}, true, false, true);
  };
  at::Tensor y1 = apply_rope(rms_norm(x, s), r), y2 = apply_rope_reference(rms_norm_reference(x, s), r);
  EXPECT_LT(rel_err(y1, y2), 1e-14);
  auto g1 = grads_of(y1), g2 = grads_of(y2);
  EXPECT_LT(rel_err(g1[0], g2[0]), 1e-12);
  EXPECT_LT(rel_err(g1[1], g2[1]), 1e-12);
  EXPECT_GT(g1[1].abs().max().item<double>(), 0.0);
}

// --- standard (diffusers/peft-style) LoRA: equal to merging scale * up @ down into the weights --
namespace {

// A float64 standard-mode set of rank 3 (alpha 6) on these targets, every up non-zero (so that
// each adapter changes the output and each down gets a gradient).
LoraSet standard_lora(const FluxConfig& cfg, std::vector<std::string> targets, uint64_t seed) {
  LoraConfig lc;
  lc.mode = LoraMode::Standard;
  lc.ranks = {3};
  lc.alphas = {6};
  lc.targets = std::move(targets);
  LoraSet lora = LoraSet::create(cfg, lc, seed, at::kDouble);
  at::manual_seed(seed + 1);
  for (auto& a : lora.adapters()) {
    at::NoGradGuard ng;
    a.up.copy_(at::randn(a.up.sizes(), kF64) * 0.2);
  }
  return lora;
}

}  // namespace

TEST(StandardLora, EqualsMergedWeights) {
  const FluxConfig cfg = tiny();
  const TensorMap full = init_random_weights(cfg, 40, at::kDouble);
  LoraSet lora = standard_lora(cfg, {"to_q", "to_v", "to_out.0", "add_k_proj", "ff.net.2", "proj_mlp", "proj_out"}, 41);
  // Merge every adapter into a copy of the weights: W[rows] += scale * up @ down.
  TensorMap merged;
  for (const auto& kv : full) merged.emplace(kv.first, kv.second.clone());
  for (const auto& a : lora.adapters()) {
    const std::string key = block_prefix(a.block, cfg.depth) + a.linear + ".weight";
    at::NoGradGuard ng;
    merged.at(key).narrow(0, a.out_begin, a.out_end - a.out_begin).add_(at::matmul(a.up, a.down) * a.scale);
  }
  ResidentBlockWeights w(full, cfg.depth, cfg.depth_single), wm(merged, cfg.depth, cfg.depth_single);
  FluxInputs in = make_inputs(cfg, 2, 4, {3}, 43);
  at::NoGradGuard ng;
  at::Tensor with_lora = flux_forward(cfg, w, &lora, in), with_merge = flux_forward(cfg, wm, nullptr, in);
  EXPECT_LT(rel_err(with_lora, with_merge), 1e-12);
  EXPECT_GT(rel_err(with_lora, flux_forward(cfg, w, nullptr, in)), 1e-4);  // the adapters do something
  // peft key format
  auto st = lora.state();
  EXPECT_TRUE(st.count("transformer.transformer_blocks.0.attn.to_q.lora_A.weight"));
  EXPECT_TRUE(st.count("transformer.single_transformer_blocks.1.proj_out.lora_B.weight"));
}

// Standard mode's gradients by central differences (float64), with adapters on the linears after
// GELU (ff.net.2, proj_out: model/gelu_linear.h's adapter path) beside the attention ones, and on
// the text stream. Every adapter's up is non-zero, so that every down gets a gradient too.
TEST(StandardLora, GradientsMatchFiniteDifferences) {
  const FluxConfig cfg = tiny();
  ResidentBlockWeights w(init_random_weights(cfg, 44, at::kDouble), cfg.depth, cfg.depth_single);
  LoraSet lora =
      standard_lora(cfg, {"to_q", "to_out.0", "add_v_proj", "ff.net.2", "ff_context.net.2", "proj_mlp", "proj_out"}, 45);
  FluxInputs in = make_inputs(cfg, 1, 3, {}, 47);
  at::Tensor r = at::randn({1, 9, cfg.out_channels}, kF64);
  (flux_forward(cfg, w, &lora, in) * r).sum().backward();
  std::vector<LoraAdapter*> some;
  for (auto& a : lora.adapters())
    if (a.target == "ff.net.2" || a.target == "ff_context.net.2" || a.target == "proj_out" ||
        (a.target == "to_q" && a.block == 0))
      some.push_back(&a);
  EXPECT_GE(some.size(), 4u);
  EXPECT_GT(check_finite_differences(cfg, w, lora, in, r, some), 20);
}

// --- EasyControl's projection LoRA (issue 9) --------------------------------------------------
namespace {

// Only the double blocks' proj_loras non-zero: the part of the condition branch that differs
// from an input-side LoRA. Condition n has rank 3 + 2n.
LoraSet proj_only_lora(const FluxConfig& cfg, int lora_num, uint64_t seed) {
  LoraConfig lc;
  lc.lora_num = lora_num;
  lc.ranks.clear();
  lc.alphas.clear();
  for (int n = 0; n < lora_num; ++n) {
    lc.ranks.push_back(3 + 2 * n);
    lc.alphas.push_back(1.5 + n);
  }
  LoraSet s = LoraSet::create(cfg, lc, seed, at::kDouble);
  at::manual_seed(seed);
  for (auto& a : s.adapters()) {
    at::NoGradGuard ng;
    if (a.key.find("proj_loras") != std::string::npos) a.up.copy_(at::randn(a.up.sizes(), kF64) * 0.5);
  }
  return s;
}

}  // namespace

TEST(EasyControlProjLora, DoubleBlockMatchesEasyControlsFormula) {
  const FluxConfig cfg = tiny();
  const TensorMap w = init_random_weights(cfg, 31, at::kDouble);
  for (std::vector<int64_t> lens : {std::vector<int64_t>{5}, std::vector<int64_t>{4, 4, 4}}) {
    const int n = static_cast<int>(lens.size());
    LoraSet lora = proj_only_lora(cfg, n, 32 + n);
    const int64_t B = 2, T = 3, L = 4, H = cfg.hidden_size;
    at::manual_seed(33);
    at::Tensor img = at::randn({B, L, H}, kF64), txt = at::randn({B, T, H}, kF64);
    at::Tensor vec = at::randn({B, H}, kF64), vec_cond = at::randn({B, H}, kF64);
    std::vector<at::Tensor> conds, cond_ids;
    for (int64_t l : lens) {
      conds.push_back(at::randn({B, l, H}, kF64));
      cond_ids.push_back(at::rand({l, 3}, kF64) * 10);
    }
    at::Tensor main_ids = at::cat({text_position_ids(T), noise_position_ids(2, 2)}, 0);
    BlockContext ctx;
    ctx.cfg = &cfg;
    ctx.lora = &lora;
    ctx.block = 0;
    ctx.cond_lens = lens;
    ctx.rope_main = rope_from_ids(main_ids, cfg.axes_dim, cfg.theta, at::kDouble);
    ctx.rope_cond = rope_from_ids(at::cat(cond_ids, 0), cfg.axes_dim, cfg.theta, at::kDouble);
    auto ours = double_block(ctx, block_map(w, "double_blocks.0."), img, txt, at::cat(conds, 1), vec, vec_cond);
    ref::EasyControlLora ec{lora.state(), lora.config().alphas, std::vector<double>(n, 1.0)};
    ref::RefInputs ri{img, txt, conds, vec, vec_cond, at::cat({main_ids, at::cat(cond_ids, 0)}, 0)};
    auto theirs = ref::double_block(cfg, block_map(w, "double_blocks.0."), &ec, 0, ri);
    std::vector<at::Tensor> rc(theirs.begin() + 2, theirs.end());
    EXPECT_LT(rel_err(ours[2], at::cat(rc, 1)), 1e-10) << n << " conditions";
    EXPECT_LT(rel_err(ours[0], theirs[0]), 1e-10) << n << " conditions, img";
    // The projection LoRA does act (a test that cannot fail proves nothing).
    auto base = double_block([&] { BlockContext c = ctx; c.lora = nullptr; return c; }(),
                             block_map(w, "double_blocks.0."), img, txt, at::cat(conds, 1), vec, vec_cond);
    EXPECT_GT(rel_err(ours[2], base[2]), 1e-3);
    // The input-side form it replaced gives a different result: the reference tells them apart.
    LoraSet input_side = lora;
    for (auto& a : input_side.adapters()) a.on_output = false;
    ctx.lora = &input_side;
    auto wrong = double_block(ctx, block_map(w, "double_blocks.0."), img, txt, at::cat(conds, 1), vec, vec_cond);
    EXPECT_GT(rel_err(wrong[2], at::cat(rc, 1)), 1e-4);
  }
}

TEST(EasyControlProjLora, FiniteDifferencesOfDownAndUp) {
  const FluxConfig cfg = tiny();
  ResidentBlockWeights w(init_random_weights(cfg, 41, at::kDouble), cfg.depth, cfg.depth_single);
  LoraSet lora = proj_only_lora(cfg, 2, 42);
  for (auto& a : lora.adapters()) {  // non-zero down too, so that d/d(up) is not trivially small
    at::NoGradGuard ng;
    a.down.mul_(3.0);
  }
  FluxInputs in = make_inputs(cfg, 1, 3, {2, 2}, 43);
  at::manual_seed(44);
  at::Tensor r = at::randn({1, 9, cfg.out_channels}, kF64);
  (flux_forward(cfg, w, &lora, in) * r).sum().backward();
  std::vector<LoraAdapter*> proj;
  for (auto& a : lora.adapters())
    if (a.on_output) proj.push_back(&a);
  const int checked = check_finite_differences(cfg, w, lora, in, r, proj);
  EXPECT_EQ(checked, cfg.depth * 2 * 2 * 3);
}

// `fluxtrain forward` with a LoRA file as EasyControl writes it (its keys, no fluxtrain metadata,
// alphas from --network_alphas), with and without the checkpointing path, equals the in-process
// model whose blocks the tests above compare with EasyControl's formulas.
TEST(EasyControlProjLora, ForwardCommandReadsEasyControlFiles) {
  const FluxConfig cfg = tiny();
  TempDir tmp;
  const TensorMap w = init_random_weights(cfg, 51, at::kFloat);
  save_bfl(tmp.path("flux1-dev.safetensors"), cfg, w);
  LoraSet lora = random_lora(cfg, 3, 52);  // ranks 4, 5, 6; alphas 2, 2.5, 3; every adapter non-zero
  TensorMap st;
  for (const auto& kv : lora.state()) st.emplace(kv.first, kv.second.to(at::kFloat).contiguous());
  safetensors::save(tmp.path("ec_lora.safetensors"), st, {{"format", "pt"}});
  FluxInputs in = make_inputs(cfg, 1, 3, {2, 2, 2}, 53);
  TensorMap inputs{{"img", in.img.to(at::kFloat)},
                   {"img_ids", in.img_ids.to(at::kFloat)},
                   {"txt", in.txt.to(at::kFloat)},
                   {"txt_ids", in.txt_ids.to(at::kFloat)},
                   {"y", in.y.to(at::kFloat)},
                   {"timesteps", in.timesteps.to(at::kFloat)},
                   {"cond", at::stack(in.cond, 0).to(at::kFloat)},
                   {"cond_ids", at::stack(in.cond_ids, 0).to(at::kFloat)}};
  if (in.guidance.defined()) inputs.emplace("guidance", in.guidance.to(at::kFloat));
  safetensors::save(tmp.path("inputs.safetensors"), inputs, {});
  // The in-process model in float64 on the same (float32-rounded) inputs and weights.
  FluxInputs in64;
  in64.img = inputs.at("img").to(at::kDouble);
  in64.img_ids = inputs.at("img_ids").to(at::kDouble);
  in64.txt = inputs.at("txt").to(at::kDouble);
  in64.txt_ids = inputs.at("txt_ids").to(at::kDouble);
  in64.y = inputs.at("y").to(at::kDouble);
  in64.timesteps = inputs.at("timesteps").to(at::kDouble);
  if (in.guidance.defined()) in64.guidance = inputs.at("guidance").to(at::kDouble);
  for (int n = 0; n < 3; ++n) {
    in64.cond.push_back(inputs.at("cond")[n].to(at::kDouble));
    in64.cond_ids.push_back(inputs.at("cond_ids")[n].to(at::kDouble));
  }
  TensorMap w64;
  for (const auto& kv : w) w64.emplace(kv.first, kv.second.to(at::kDouble));
  ResidentBlockWeights rw(w64, cfg.depth, cfg.depth_single);
  LoraSet l64 = lora;
  l64.load_state(st, "in-memory");
  at::Tensor want;
  {
    at::NoGradGuard ng;
    want = flux_forward(cfg, rw, &l64, in64);
  }
  for (const char* ckpt : {"", " --gradient_checkpointing"}) {
    std::string log;
    const std::string cmd = std::string(FLUXTRAIN_BIN) + " forward --pretrained_model_name_or_path " + tmp.dir() +
                            " --inputs " + tmp.path("inputs.safetensors") + " --output " + tmp.path("out.safetensors") +
                            " --lora " + tmp.path("ec_lora.safetensors") + " --network_alphas 2 2.5 3 --dtype f64" + ckpt;
    ASSERT_EQ(run_command(cmd, &log), 0) << log;
    at::Tensor got = safetensors::File(tmp.path("out.safetensors")).load("output");
    EXPECT_LT(rel_err(got, want), 1e-12) << ckpt;
  }
}

// The bench's low-memory rows draw the model a block at a time (init_random_block_weights): the
// globals and the blocks together are exactly the model's keys and shapes, each block is
// deterministic in (seed, block) and drawn from its own stream, and the values follow the
// documented rules (scales ~ N(1, 0.1), biases ~ N(0, 0.02), linears std 1/sqrt(fan_in)).
TEST(RandomWeights, BlockByBlockCoversTheModelDeterministically) {
  FluxConfig cfg = FluxConfig::preset("tiny");
  std::map<std::string, std::vector<int64_t>> want;
  for (const auto& [name, shape] : flux_weight_shapes(cfg)) want[name] = shape;
  std::map<std::string, std::vector<int64_t>> got;
  for (const auto& [name, t] : init_random_global_weights(cfg, 3, at::kFloat)) {
    EXPECT_EQ(name.find("_blocks."), std::string::npos) << name;
    got[name] = t.sizes().vec();
  }
  const int n = static_cast<int>(cfg.depth + cfg.depth_single);
  for (int i = 0; i < n; ++i) {
    const std::string prefix = i < cfg.depth ? "double_blocks." + std::to_string(i) + "."
                                             : "single_blocks." + std::to_string(i - cfg.depth) + ".";
    TensorMap b = init_random_block_weights(cfg, 3, i, at::kFloat);
    ASSERT_FALSE(b.empty()) << i;
    for (const auto& [name, t] : b) {
      EXPECT_EQ(name.find("blocks."), std::string::npos) << "block-local names: " << name;
      EXPECT_EQ(t.scalar_type(), at::kFloat);
      got[prefix + name] = t.sizes().vec();
    }
  }
  EXPECT_EQ(got, want);
  // Deterministic in (seed, block); another block or seed draws other values.
  TensorMap a = init_random_block_weights(cfg, 3, 1, at::kBFloat16), a2 = init_random_block_weights(cfg, 3, 1, at::kBFloat16);
  TensorMap other_block = init_random_block_weights(cfg, 3, 0, at::kBFloat16);
  TensorMap other_seed = init_random_block_weights(cfg, 4, 1, at::kBFloat16);
  for (const auto& [name, t] : a) {
    EXPECT_EQ(t.scalar_type(), at::kBFloat16);
    EXPECT_TRUE(at::equal(t, a2.at(name))) << name;
    EXPECT_FALSE(at::equal(t, other_seed.at(name))) << name;
    if (other_block.count(name)) EXPECT_FALSE(at::equal(t, other_block.at(name))) << name;
  }
  EXPECT_THROW(init_random_block_weights(cfg, 3, n, at::kFloat), Error);
  // The distributions, on a model wide enough for the statistics (flux-dev's first double block).
  FluxConfig dev = FluxConfig::preset("flux-dev");
  dev.depth = 1;
  dev.depth_single = 0;
  TensorMap d = init_random_block_weights(dev, 5, 0, at::kFloat);
  const at::Tensor& qkv = d.at("img_attn.qkv.weight");  // [3H, H]
  EXPECT_NEAR(qkv.std().item<double>() * std::sqrt(static_cast<double>(qkv.size(1))), 1.0, 0.01);
  EXPECT_NEAR(qkv.mean().item<double>(), 0.0, 1e-3);
  const at::Tensor& mod = d.at("img_mod.lin.weight");
  EXPECT_NEAR(mod.std().item<double>() * std::sqrt(static_cast<double>(mod.size(1))), 0.3, 0.01);
  const at::Tensor& sc = d.at("img_attn.norm.query_norm.scale");
  EXPECT_NEAR(sc.mean().item<double>(), 1.0, 0.05);
  EXPECT_NEAR(d.at("img_attn.qkv.bias").std().item<double>(), 0.02, 0.002);
}
