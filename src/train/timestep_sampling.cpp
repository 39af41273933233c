#include "train/timestep_sampling.h"

#include <algorithm>
#include <cmath>

#include "train/train_options.h"
#include "core/error.h"
#include "core/rng.h"

namespace fluxtrain {

TimestepSampler TimestepSampler::from_config(const TrainConfig& c) {
  TimestepSampler s;
  s.scheme = c.weighting_scheme;
  s.logit_mean = c.logit_mean;
  s.logit_std = c.logit_std;
  s.mode_scale = c.mode_scale;
  s.sigmoid_scale = c.sigmoid_scale;
  s.shift = c.timestep_shift;
  return s;
}

double TimestepSampler::sample_u(ScalarRng& rng) const {
  auto sigmoid = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  if (scheme == "none") return rng.uniform();
  if (scheme == "logit_normal") return sigmoid(logit_mean + logit_std * rng.normal());
  if (scheme == "mode") {
    const double v = rng.uniform();
    const double c = std::cos(M_PI * v / 2.0);
    return 1.0 - v - mode_scale * (c * c - 1.0 + v);
  }
  if (scheme == "sigmoid") return sigmoid(sigmoid_scale * rng.normal());
  throw Error("--weighting_scheme: unknown scheme '" + scheme + "'");
}

double shift_sigma(double sigma, double shift) {
  if (shift == 1.0) return sigma;
  return shift * sigma / (1.0 + (shift - 1.0) * sigma);
}

double TimestepSampler::u_to_sigma(double u) const {
  const int n = num_train_timesteps;
  const int64_t index = std::clamp<int64_t>(static_cast<int64_t>(std::floor(u * n)), 0, n - 1);
  const double sigma = static_cast<double>(n - index) / n;
  return shift_sigma(sigma, shift);
}

double TimestepSampler::sigma_for(uint64_t seed, uint64_t epoch, uint64_t sample_index) const {
  ScalarRng rng(derive_seed(seed, RngPurpose::Timestep, epoch, sample_index));
  return u_to_sigma(sample_u(rng));
}

}  // namespace fluxtrain
