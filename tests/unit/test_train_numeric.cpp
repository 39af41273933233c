// Numeric pieces of the trainer against independent references: timestep samplers against their
// analytic distributions (moments by quadrature, Kolmogorov-Smirnov against the CDF), the
// u -> sigma table and shift by hand, LR schedules against hand-computed closed-form values,
// AdamW and clipping against scalar loops written from PyTorch's documented algorithm, and the
// flow-matching formulas against element-wise loops.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <functional>
#include <vector>

#include <ATen/ATen.h>

#include "train/run_config.h"
#include "core/rng.h"
#include "train/flow_matching.h"
#include "train/lr_schedule.h"
#include "train/optimizer.h"
#include "train/timestep_sampling.h"

namespace fluxtrain {
namespace {

constexpr int kDraws = 20000;

std::vector<double> draw_u(const TimestepSampler& s, uint64_t seed) {
  std::vector<double> u;
  for (int i = 0; i < kDraws; ++i) {
    ScalarRng rng(derive_seed(seed, RngPurpose::Timestep, 0, static_cast<uint64_t>(i)));
    u.push_back(s.sample_u(rng));
  }
  return u;
}

// Kolmogorov-Smirnov statistic of the samples against a CDF.
double ks(std::vector<double> x, const std::function<double(double)>& cdf) {
  std::sort(x.begin(), x.end());
  const double n = static_cast<double>(x.size());
  double d = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double f = cdf(x[i]);
    d = std::max({d, std::abs(f - i / n), std::abs((i + 1) / n - f)});
  }
  return d;
}

double mean(const std::vector<double>& x) {
  double s = 0;
  for (double v : x) s += v;
  return s / x.size();
}
double var(const std::vector<double>& x) {
  const double m = mean(x);
  double s = 0;
  for (double v : x) s += (v - m) * (v - m);
  return s / (x.size() - 1);
}

double phi_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// E[g(sigmoid(m + s Z))] for Z ~ N(0,1), by the trapezoid rule on [-12, 12].
double logit_normal_moment(double m, double s, int power) {
  const int n = 200000;
  const double a = -12, b = 12, h = (b - a) / n;
  double acc = 0;
  for (int i = 0; i <= n; ++i) {
    const double z = a + i * h;
    const double w = (i == 0 || i == n) ? 0.5 : 1.0;
    acc += w * std::pow(sigmoid(m + s * z), power) * std::exp(-0.5 * z * z) / std::sqrt(2 * M_PI);
  }
  return acc * h;
}

// KS 1% critical value is 1.63/sqrt(n) = 0.0115; the fixed seeds make this deterministic.
constexpr double kKs = 1.63 / 141.42;

TEST(TimestepSampling, UniformMatchesItsDistribution) {
  TimestepSampler s;  // none
  auto u = draw_u(s, 11);
  EXPECT_NEAR(mean(u), 0.5, 4 * std::sqrt(1.0 / 12 / kDraws));
  EXPECT_NEAR(var(u), 1.0 / 12, 0.003);
  EXPECT_LT(ks(u, [](double x) { return x; }), kKs);
}

TEST(TimestepSampling, LogitNormalMatchesItsDistribution) {
  TimestepSampler s;
  s.scheme = "logit_normal";
  s.logit_mean = 0.3;
  s.logit_std = 0.8;
  auto u = draw_u(s, 12);
  const double m1 = logit_normal_moment(0.3, 0.8, 1), m2 = logit_normal_moment(0.3, 0.8, 2);
  EXPECT_NEAR(mean(u), m1, 4 * std::sqrt((m2 - m1 * m1) / kDraws));
  EXPECT_NEAR(var(u), m2 - m1 * m1, 0.003);
  EXPECT_LT(ks(u, [](double x) { return phi_cdf((std::log(x / (1 - x)) - 0.3) / 0.8); }), kKs);
  // A wrong mean would be visible: the same draws are far from a logit-normal of mean 0.
  EXPECT_GT(ks(u, [](double x) { return phi_cdf(std::log(x / (1 - x)) / 0.8); }), 5 * kKs);
}

TEST(TimestepSampling, SigmoidMatchesItsDistribution) {
  TimestepSampler s;
  s.scheme = "sigmoid";
  s.sigmoid_scale = 1.7;
  auto u = draw_u(s, 13);
  const double m1 = logit_normal_moment(0, 1.7, 1), m2 = logit_normal_moment(0, 1.7, 2);
  EXPECT_NEAR(mean(u), m1, 4 * std::sqrt((m2 - m1 * m1) / kDraws));
  EXPECT_NEAR(var(u), m2 - m1 * m1, 0.003);
  EXPECT_LT(ks(u, [](double x) { return phi_cdf(std::log(x / (1 - x)) / 1.7); }), kKs);
}

TEST(TimestepSampling, ModeMatchesItsDistribution) {
  const double scale = 1.29;
  TimestepSampler s;
  s.scheme = "mode";
  s.mode_scale = scale;
  auto f = [&](double v) { return 1 - v - scale * (std::pow(std::cos(M_PI * v / 2), 2) - 1 + v); };
  // f is decreasing on [0,1] for scale < 1.75: P(f(V) <= x) = 1 - f^{-1}(x), f^{-1} by bisection.
  auto cdf = [&](double x) {
    double lo = 0, hi = 1;
    for (int i = 0; i < 60; ++i) {
      const double mid = 0.5 * (lo + hi);
      (f(mid) > x ? lo : hi) = mid;
    }
    return 1 - 0.5 * (lo + hi);
  };
  double m1 = 0, m2 = 0;
  const int n = 100000;
  for (int i = 0; i < n; ++i) {  // midpoint rule over v
    const double v = (i + 0.5) / n;
    m1 += f(v) / n;
    m2 += f(v) * f(v) / n;
  }
  EXPECT_NEAR(m1, 0.5, 1e-9);  // closed form: the scale term integrates to 0
  auto u = draw_u(s, 14);
  EXPECT_NEAR(mean(u), m1, 4 * std::sqrt((m2 - m1 * m1) / kDraws));
  EXPECT_NEAR(var(u), m2 - m1 * m1, 0.003);
  EXPECT_LT(ks(u, cdf), kKs);
  for (double x : u) {
    EXPECT_GE(x, 0.0);
    EXPECT_LE(x, 1.0);
  }
}

TEST(TimestepSampling, SigmaTableAndShiftByHand) {
  TimestepSampler s;
  // index = floor(u * 1000), sigma = (1000 - index) / 1000 (FlowMatchEulerDiscreteScheduler's
  // training timesteps 1000..1 divided by 1000).
  EXPECT_DOUBLE_EQ(s.u_to_sigma(0.0), 1.0);
  EXPECT_DOUBLE_EQ(s.u_to_sigma(0.0009), 1.0);
  EXPECT_DOUBLE_EQ(s.u_to_sigma(0.001), 0.999);
  EXPECT_DOUBLE_EQ(s.u_to_sigma(0.5), 0.5);
  EXPECT_DOUBLE_EQ(s.u_to_sigma(0.7234), 0.277);
  EXPECT_DOUBLE_EQ(s.u_to_sigma(0.9999), 0.001);
  EXPECT_DOUBLE_EQ(s.u_to_sigma(1.0), 0.001);  // clamped to the last index
  s.shift = 3.0;                                // 3s / (1 + 2s)
  EXPECT_DOUBLE_EQ(s.u_to_sigma(0.5), 0.75);
  EXPECT_DOUBLE_EQ(s.u_to_sigma(0.0), 1.0);
  EXPECT_NEAR(s.u_to_sigma(0.9), 0.3 / 1.2, 1e-15);
  EXPECT_NEAR(shift_sigma(0.2, 0.5), 0.1 / 0.9, 1e-15);
}

TEST(TimestepSampling, DrawsDependOnlyOnSeedEpochAndIndex) {
  TimestepSampler s;
  EXPECT_EQ(s.sigma_for(5, 2, 17), s.sigma_for(5, 2, 17));
  int same = 0;
  for (uint64_t i = 0; i < 100; ++i) same += s.sigma_for(5, 2, i) == s.sigma_for(5, 3, i);
  EXPECT_LT(same, 5);  // a different epoch gives different draws (a few equal by chance)
  same = 0;
  for (uint64_t i = 0; i < 100; ++i) same += s.sigma_for(5, 2, i) == s.sigma_for(6, 2, i);
  EXPECT_LT(same, 5);
}

TEST(LrSchedule, MatchesClosedFormsByHand) {
  LrSchedule c{"constant", 2e-4, 500, 1000};
  EXPECT_DOUBLE_EQ(c.lr(0), 2e-4);  // constant ignores warm-up (as diffusers)
  EXPECT_DOUBLE_EQ(c.lr(999), 2e-4);

  LrSchedule w{"constant_with_warmup", 1.0, 10, 100};
  EXPECT_DOUBLE_EQ(w.lr(0), 0.0);
  EXPECT_DOUBLE_EQ(w.lr(5), 0.5);
  EXPECT_DOUBLE_EQ(w.lr(10), 1.0);
  EXPECT_DOUBLE_EQ(w.lr(1000), 1.0);

  LrSchedule l{"linear", 1.0, 10, 110};
  EXPECT_DOUBLE_EQ(l.lr(3), 0.3);
  EXPECT_DOUBLE_EQ(l.lr(10), 1.0);
  EXPECT_DOUBLE_EQ(l.lr(60), 0.5);
  EXPECT_DOUBLE_EQ(l.lr(85), 0.25);
  EXPECT_DOUBLE_EQ(l.lr(110), 0.0);
  EXPECT_DOUBLE_EQ(l.lr(150), 0.0);
  LrSchedule l0{"linear", 1.0, 0, 4};
  EXPECT_DOUBLE_EQ(l0.lr(0), 1.0);
  EXPECT_DOUBLE_EQ(l0.lr(1), 0.75);

  LrSchedule k{"cosine", 1.0, 10, 110};
  EXPECT_DOUBLE_EQ(k.lr(4), 0.4);
  EXPECT_DOUBLE_EQ(k.lr(10), 1.0);
  EXPECT_NEAR(k.lr(35), 0.8535533905932737, 1e-15);  // (1 + cos(pi/4)) / 2
  EXPECT_NEAR(k.lr(60), 0.5, 1e-15);
  EXPECT_NEAR(k.lr(85), 0.14644660940672624, 1e-15);  // (1 + cos(3pi/4)) / 2
  EXPECT_NEAR(k.lr(110), 0.0, 1e-15);
  EXPECT_DOUBLE_EQ(k.lr(200), 0.0);
}

TEST(AdamW, MatchesScalarReference) {
  // Reference: PyTorch's documented AdamW, element by element in double.
  const double lr = 3e-3, b1 = 0.8, b2 = 0.95, eps = 1e-6, wd = 0.1;
  auto gen = cpu_generator(3);
  at::Tensor p0 = at::randn({7, 5}, gen, at::kDouble);
  std::vector<at::Tensor> grads;
  for (int t = 0; t < 4; ++t) grads.push_back(at::randn({7, 5}, gen, at::kDouble) * (t + 1));

  at::Tensor p = p0.clone().set_requires_grad(true);
  auto opt = make_adamw({{"all", {p}}}, AdamWConfig{b1, b2, eps, wd});
  for (int t = 0; t < 4; ++t) {
    p.mutable_grad() = grads[t].clone();
    opt->step(lr * (t + 1), /*max_grad_norm=*/0);
  }

  std::vector<double> ref(p0.data_ptr<double>(), p0.data_ptr<double>() + p0.numel());
  std::vector<double> m(ref.size(), 0), v(ref.size(), 0);
  for (int t = 1; t <= 4; ++t) {
    const double* g = grads[t - 1].data_ptr<double>();
    const double a = lr * t;
    for (size_t i = 0; i < ref.size(); ++i) {
      ref[i] -= a * wd * ref[i];
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const double mh = m[i] / (1 - std::pow(b1, t)), vh = v[i] / (1 - std::pow(b2, t));
      ref[i] -= a * mh / (std::sqrt(vh) + eps);
    }
  }
  const double* got = p.data_ptr<double>();
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-13 * (1 + std::abs(ref[i])));
  EXPECT_EQ(opt->steps(), 4);
}

// Parameter groups: each group's learning rate is the step's lr times its lr_scale, and the
// clipping norm spans all groups (the same reference loop, group by group).
TEST(AdamW, GroupsHaveTheirOwnLearningRateAndShareTheClippingNorm) {
  const double lr = 1e-2, scale = 0.25, max_norm = 0.5;
  auto gen = cpu_generator(5);
  at::Tensor a0 = at::randn({4}, gen, at::kDouble), b0 = at::randn({3}, gen, at::kDouble);
  at::Tensor ga = at::randn({4}, gen, at::kDouble), gb = at::randn({3}, gen, at::kDouble);
  at::Tensor a = a0.clone().set_requires_grad(true), b = b0.clone().set_requires_grad(true);
  AdamWConfig c;
  auto opt = make_adamw({{"transformer", {a}, 1.0}, {"text_encoder", {b}, scale}}, c);
  a.mutable_grad() = ga.clone();
  b.mutable_grad() = gb.clone();
  const double norm = std::sqrt(ga.pow(2).sum().item<double>() + gb.pow(2).sum().item<double>());
  EXPECT_NEAR(opt->step(lr, max_norm), norm, 1e-12);
  const double coef = max_norm / (norm + 1e-6);
  auto ref = [&](const at::Tensor& p0, const at::Tensor& g, double l, int64_t i) {
    const double gi = g[i].item<double>() * coef, pi = p0[i].item<double>() * (1 - l * c.weight_decay);
    const double m = (1 - c.beta1) * gi / (1 - c.beta1), v = (1 - c.beta2) * gi * gi / (1 - c.beta2);
    return pi - l * m / (std::sqrt(v) + c.eps);
  };
  for (int64_t i = 0; i < 4; ++i) EXPECT_NEAR(a[i].item<double>(), ref(a0, ga, lr, i), 1e-14);
  for (int64_t i = 0; i < 3; ++i) EXPECT_NEAR(b[i].item<double>(), ref(b0, gb, lr * scale, i), 1e-14);
}

TEST(AdamW, StateRoundTripContinuesIdentically) {
  auto gen = cpu_generator(4);
  at::Tensor g1 = at::randn({3, 4}, gen), g2 = at::randn({3, 4}, gen);
  at::Tensor a = at::randn({3, 4}, gen).set_requires_grad(true);
  at::Tensor b = a.detach().clone().set_requires_grad(true);
  auto oa = make_adamw({{"", {a}}}, {}), ob = make_adamw({{"", {b}}}, {});
  a.mutable_grad() = g1.clone();
  oa->step(1e-2, 0);
  b.mutable_grad() = g1.clone();
  ob->step(1e-2, 0);
  auto oc = make_adamw({{"", {b}}}, {});
  oc->load_state(ob->state(), ob->steps(), "test");
  a.mutable_grad() = g2.clone();
  oa->step(1e-2, 0);
  b.mutable_grad() = g2.clone();
  oc->step(1e-2, 0);
  EXPECT_TRUE(at::equal(a, b));
}

// The device-side update (the trainer's single-process path and its CUDA graph): the same
// scalar reference as above, with PyTorch's clip_grad_norm_ coefficient computed in double, the
// rate in a tensor, and the skip flag / a non-finite norm leaving everything unchanged.
TEST(AdamW, DeviceStepMatchesScalarReferenceAndSkips) {
  const double lr = 2e-3, b1 = 0.85, b2 = 0.97, eps = 1e-7, wd = 0.05, max_norm = 3.0;
  auto gen = cpu_generator(9);
  at::Tensor p0 = at::randn({6, 4}, gen, at::kDouble);
  std::vector<at::Tensor> grads;
  for (int t = 0; t < 5; ++t) grads.push_back(at::randn({6, 4}, gen, at::kDouble) * (t + 1));
  at::Tensor p = p0.clone().set_requires_grad(true);
  auto opt = make_adamw({{"all", {p}}}, AdamWConfig{b1, b2, eps, wd});
  ASSERT_TRUE(opt->has_device_step());
  at::Tensor lr_t = at::zeros({}, at::kDouble), skip = at::zeros({}, at::kFloat);
  std::vector<double> ref(p0.data_ptr<double>(), p0.data_ptr<double>() + p0.numel());
  std::vector<double> m(ref.size(), 0), v(ref.size(), 0);
  int t_ref = 0;
  for (int t = 0; t < 5; ++t) {
    const bool skipped = t == 2;  // the flag: nothing may change
    p.mutable_grad() = grads[t].clone();
    lr_t.fill_(lr * (t + 1));
    skip.fill_(skipped ? 1.0 : 0.0);
    const at::Tensor before = p.detach().clone();
    const auto d = opt->step_on_device(lr_t, max_norm, skip);
    opt->count_device_step(d.applied.item<double>() > 0.5);
    const double* g = grads[t].data_ptr<double>();
    double sq = 0;
    for (size_t i = 0; i < ref.size(); ++i) sq += g[i] * g[i];
    EXPECT_NEAR(d.norm.item<double>(), std::sqrt(sq), 1e-12 * std::sqrt(sq));
    if (skipped) {
      EXPECT_EQ(d.applied.item<double>(), 0.0);
      EXPECT_TRUE(at::equal(p.detach(), before));
      continue;
    }
    EXPECT_EQ(d.applied.item<double>(), 1.0);
    ++t_ref;
    const double coef = std::min(1.0, max_norm / (std::sqrt(sq) + 1e-6)), a = lr * (t + 1);
    for (size_t i = 0; i < ref.size(); ++i) {
      const double gi = g[i] * coef;
      ref[i] -= a * wd * ref[i];
      m[i] = b1 * m[i] + (1 - b1) * gi;
      v[i] = b2 * v[i] + (1 - b2) * gi * gi;
      const double mh = m[i] / (1 - std::pow(b1, t_ref)), vh = v[i] / (1 - std::pow(b2, t_ref));
      ref[i] -= a * mh / (std::sqrt(vh) + eps);
    }
    const double* got = p.data_ptr<double>();
    for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-13 * (1 + std::abs(ref[i])));
  }
  EXPECT_EQ(opt->steps(), 4);
  // A non-finite gradient: skipped without the flag, parameters and step count unchanged.
  p.mutable_grad() = grads[0].clone();
  p.mutable_grad()[0][0] = std::numeric_limits<double>::infinity();
  skip.fill_(0.0);
  const at::Tensor before = p.detach().clone();
  const auto d = opt->step_on_device(lr_t, max_norm, skip);
  EXPECT_EQ(d.applied.item<double>(), 0.0);
  EXPECT_FALSE(std::isfinite(d.norm.item<double>()));
  EXPECT_TRUE(at::equal(p.detach(), before));
  // Resuming sets the device step count: the next update's bias correction is the 5th.
  auto o2 = make_adamw({{"all", {p}}}, AdamWConfig{b1, b2, eps, wd});
  o2->load_state(opt->state(), opt->steps(), "test");
  EXPECT_EQ(o2->steps(), 4);
}

TEST(ClipGradNorm, MatchesReference) {
  at::Tensor a = at::zeros({2, 2}, at::kDouble).set_requires_grad(true);
  at::Tensor b = at::zeros({3}, at::kDouble).set_requires_grad(true);
  a.mutable_grad() = at::tensor({1.0, 2.0, 3.0, 4.0}, at::kDouble).view({2, 2});
  b.mutable_grad() = at::tensor({0.0, 5.0, 1.0}, at::kDouble);
  const double norm = std::sqrt(1 + 4 + 9 + 16 + 25 + 1.0);
  EXPECT_NEAR(clip_grad_norm({a, b}, 100.0), norm, 1e-12);
  EXPECT_DOUBLE_EQ(b.grad()[1].item<double>(), 5.0);  // below the limit: untouched
  EXPECT_NEAR(clip_grad_norm({a, b}, 2.0), norm, 1e-12);
  const double c = 2.0 / (norm + 1e-6);
  EXPECT_NEAR(a.grad()[1][1].item<double>(), 4.0 * c, 1e-12);
  EXPECT_NEAR(b.grad()[1].item<double>(), 5.0 * c, 1e-12);
  EXPECT_NEAR(grad_global_norm({a, b}), 2.0 * norm / (norm + 1e-6), 1e-12);
  b.mutable_grad()[0] = std::nan("");
  EXPECT_TRUE(std::isnan(clip_grad_norm({a, b}, 1.0)));
}

TEST(FlowMatching, PackUnpackMatchesLoops) {
  auto gen = cpu_generator(5);
  at::Tensor x = at::randn({2, 3, 4, 6}, gen, at::kDouble);
  at::Tensor p = pack_latents(x);
  ASSERT_EQ(p.sizes(), (std::vector<int64_t>{2, 6, 12}));
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t i = 0; i < 2; ++i)
        for (int64_t j = 0; j < 3; ++j)
          for (int64_t dy = 0; dy < 2; ++dy)
            for (int64_t dx = 0; dx < 2; ++dx)
              ASSERT_EQ(p[b][i * 3 + j][c * 4 + dy * 2 + dx].item<double>(),
                        x[b][c][2 * i + dy][2 * j + dx].item<double>());
  EXPECT_TRUE(at::equal(unpack_latents(p, 4, 6), x));
}

TEST(FlowMatching, InterpolationTargetAndLossMatchLoops) {
  auto gen = cpu_generator(6);
  at::Tensor x = at::randn({3, 2, 2, 2}, gen, at::kDouble), n = at::randn({3, 2, 2, 2}, gen, at::kDouble);
  at::Tensor s = at::tensor({0.1, 0.5, 1.0}, at::kDouble);
  at::Tensor xt = noisy_latents(x, n, s), tg = flow_target(x, n);
  at::Tensor pred = at::randn({3, 2, 2, 2}, gen, at::kDouble);
  at::Tensor mse = per_sample_mse(pred, tg);
  for (int64_t b = 0; b < 3; ++b) {
    const double sb = s[b].item<double>();
    double acc = 0;
    for (int64_t k = 0; k < 8; ++k) {
      const double xv = x[b].flatten()[k].item<double>(), nv = n[b].flatten()[k].item<double>();
      EXPECT_NEAR(xt[b].flatten()[k].item<double>(), (1 - sb) * xv + sb * nv, 1e-15);
      EXPECT_NEAR(tg[b].flatten()[k].item<double>(), nv - xv, 1e-15);
      const double d = pred[b].flatten()[k].item<double>() - (nv - xv);
      acc += d * d;
    }
    EXPECT_NEAR(mse[b].item<double>(), acc / 8, 1e-14);
  }
  // bf16 predictions are reduced in float32.
  EXPECT_EQ(per_sample_mse(pred.to(at::kBFloat16), tg.to(at::kBFloat16)).scalar_type(), at::kFloat);
}

TEST(FlowMatching, NoiseDependsOnlyOnSeedEpochAndIndex) {
  at::Tensor a = sample_noise({4, 6, 6}, 9, 1, 33), b = sample_noise({4, 6, 6}, 9, 1, 33);
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_FALSE(at::equal(a, sample_noise({4, 6, 6}, 9, 1, 34)));
  EXPECT_FALSE(at::equal(a, sample_noise({4, 6, 6}, 9, 2, 33)));
  at::Tensor big = sample_noise({200000}, 1, 0, 0);
  EXPECT_NEAR(big.mean().item<double>(), 0.0, 0.01);
  EXPECT_NEAR(big.std().item<double>(), 1.0, 0.01);
}

}  // namespace
}  // namespace fluxtrain
