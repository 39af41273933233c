// fluxtrain's clipping + AdamW (train/optimizer.h) against the implementation users run today:
// torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW from PyPI (tests/py/adamw_reference.py),
// float64, two parameter groups with different learning-rate scales, a rate that changes every
// update and gradients large enough that clipping engages on most updates. Both the host update
// (step) and the device update (step_on_device, here on the CPU) must agree with PyTorch to a
// relative 1e-12 on parameters, both moments and the returned norms.
#include <gtest/gtest.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "core/rng.h"
#include "core/safetensors.h"
#include "support/test_util.h"
#include "train/optimizer.h"

using namespace fluxtrain;

namespace {

constexpr int kUpdates = 6;
constexpr double kMaxNorm = 2.5, kB1 = 0.85, kB2 = 0.97, kEps = 1e-7, kWd = 0.05;
const std::vector<double> kScales = {1.0, 0.25};

std::string num(double x) {
  std::ostringstream s;
  s.precision(17);
  s << x;
  return s.str();
}

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).abs().max() / (b.abs().max() + 1e-300)).item<double>();
}

}  // namespace

TEST(AdamW, MatchesTorchAdamWWithClipping) {
  TempDir d;
  auto gen = cpu_generator(21);
  const std::vector<std::vector<int64_t>> shapes = {{5, 3}, {7}, {4, 2}};
  const std::vector<int64_t> group_of = {0, 0, 1};
  TensorMap in;
  std::vector<at::Tensor> p0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    p0.push_back(at::randn(shapes[i], gen, at::kDouble));
    in["p." + std::to_string(i)] = p0.back();
  }
  std::vector<std::vector<at::Tensor>> grads(kUpdates);
  for (int t = 0; t < kUpdates; ++t)
    for (size_t i = 0; i < shapes.size(); ++i) {
      // Growing gradients: the norm passes max_norm after the first update, so clipping engages.
      grads[t].push_back(at::randn(shapes[i], gen, at::kDouble) * (0.3 + t));
      in["g." + std::to_string(t) + "." + std::to_string(i)] = grads[t].back();
    }
  std::vector<double> lrs;
  for (int t = 0; t < kUpdates; ++t) lrs.push_back(1e-2 * (1.0 + 0.5 * t));
  in["lr"] = at::tensor(lrs, at::kDouble);
  in["group"] = at::tensor(group_of, at::kLong);
  const std::string src = d.path("in.safetensors"), ref_path = d.path("ref.safetensors");
  safetensors::save(src, in);
  const std::string cmd = "python3 " + std::string(FLUXTRAIN_SOURCE_DIR) + "/tests/py/adamw_reference.py " + src +
                          " " + ref_path + " " + num(kScales[0]) + "," + num(kScales[1]) + " " + num(kMaxNorm) + " " +
                          num(kB1) + " " + num(kB2) + " " + num(kEps) + " " + num(kWd);
  std::string out;
  ASSERT_EQ(run_command(cmd + " 2>&1", &out), 0) << "needs python3 with torch + safetensors: " << out;
  const TensorMap ref = safetensors::load(ref_path);

  for (bool device : {false, true}) {
    SCOPED_TRACE(device ? "step_on_device" : "step");
    std::vector<at::Tensor> params;
    for (const auto& p : p0) params.push_back(p.clone().set_requires_grad(true));
    std::vector<ParamGroup> groups = {{"a", {params[0], params[1]}, kScales[0]}, {"b", {params[2]}, kScales[1]}};
    auto opt = make_adamw(groups, AdamWConfig{kB1, kB2, kEps, kWd});
    const at::Tensor lr_t = at::zeros({}, at::kDouble), skip = at::zeros({}, at::kFloat);
    for (int t = 0; t < kUpdates; ++t) {
      for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = grads[t][i].clone();
      double norm;
      if (device) {
        lr_t.fill_(lrs[t]);
        const auto r = opt->step_on_device(lr_t, kMaxNorm, skip);
        ASSERT_EQ(r.applied.item<double>(), 1.0);
        opt->count_device_step(true);
        norm = r.norm.item<double>();
      } else {
        norm = opt->step(lrs[t], kMaxNorm);
      }
      const double want = ref.at("norm")[t].item<double>();
      EXPECT_NEAR(norm, want, 1e-12 * want) << "update " << t;
      if (t > 0) EXPECT_GT(want, kMaxNorm) << "the test means clipping to engage";
    }
    const TensorMap state = opt->state();
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string k = std::to_string(i);
      EXPECT_LT(max_rel(params[i].detach(), ref.at("p." + k)), 1e-12) << "parameter " << i;
      EXPECT_LT(max_rel(state.at("exp_avg." + k), ref.at("exp_avg." + k)), 1e-12) << "exp_avg " << i;
      EXPECT_LT(max_rel(state.at("exp_avg_sq." + k), ref.at("exp_avg_sq." + k)), 1e-12) << "exp_avg_sq " << i;
    }
    EXPECT_EQ(opt->steps(), kUpdates);
  }
}
