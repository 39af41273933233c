// Timestep (sigma) sampling for flow-matching training, as EasyControl / diffusers' FLUX scripts:
//   u ~ density(weighting_scheme) in [0, 1]
//   index = clamp(floor(u * 1000), 0, 999) into FlowMatchEulerDiscreteScheduler's training
//           timesteps 1000, 999, ..., 1 (FLUX.1 uses dynamic shifting, so no shift at training init)
//   sigma = timesteps[index] / 1000 = (1000 - index) / 1000           in {0.001, ..., 1}
//   optional shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)  (shift 1 = none)
// The model receives sigma as its timestep (timesteps / 1000).
//
// Densities for u:
//   none:         U[0, 1)
//   logit_normal: sigmoid(N(logit_mean, logit_std))
//   mode:         v ~ U[0,1);  u = 1 - v - mode_scale * (cos^2(pi v / 2) - 1 + v)
//   sigmoid:      sigmoid(sigmoid_scale * N(0, 1))   (kohya's "sigmoid" sampling)
#pragma once
#include <cstdint>
#include <string>

namespace fluxtrain {

struct TrainConfig;
class ScalarRng;

struct TimestepSampler {
  std::string scheme = "none";
  double logit_mean = 0.0, logit_std = 1.0, mode_scale = 1.29, sigmoid_scale = 1.0;
  double shift = 1.0;
  int num_train_timesteps = 1000;

  static TimestepSampler from_config(const TrainConfig& c);
  double sample_u(ScalarRng& rng) const;  // density draw in [0, 1]
  double u_to_sigma(double u) const;      // index lookup + shift
  // The draw for one sample: generator seeded by (seed, Timestep, epoch, sample index).
  double sigma_for(uint64_t seed, uint64_t epoch, uint64_t sample_index) const;
};

double shift_sigma(double sigma, double shift);

}  // namespace fluxtrain
