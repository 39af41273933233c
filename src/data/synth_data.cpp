#include "data/synth_data.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/rng.h"

namespace fluxtrain {
namespace {

at::Tensor smooth_field(int64_t c, int64_t h, int64_t w, at::Generator& gen) {
  at::Tensor low = at::randn({1, c, 4, 4}, gen, at::TensorOptions().dtype(at::kDouble));
  at::Tensor f = at::upsample_bilinear2d(low, {h, w}, /*align_corners=*/true)[0];
  f = f - f.mean({1, 2}, true);
  return f / (f.std() + 1e-12);
}

// Signed permutation of the channels for condition k (fixed for the dataset).
std::pair<std::vector<int64_t>, std::vector<double>> channel_map(const SynthSpec& s, int64_t k) {
  ScalarRng rng(derive_seed(s.seed, RngPurpose::Synthetic, 1, static_cast<uint64_t>(k)));
  std::vector<int64_t> perm(static_cast<size_t>(s.latent_channels));
  for (int64_t i = 0; i < s.latent_channels; ++i) perm[static_cast<size_t>(i)] = i;
  for (int64_t i = s.latent_channels - 1; i > 0; --i)
    std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(static_cast<int64_t>(rng.uniform() * (i + 1)))]);
  std::vector<double> sign;
  for (int64_t i = 0; i < s.latent_channels; ++i) sign.push_back(rng.uniform() < 0.5 ? -1.0 : 1.0);
  return {perm, sign};
}

}  // namespace

Sample synthetic_sample(const SynthSpec& s, int64_t i) {
  check_input(!s.sizes.empty(), "synth-data: --sizes needs at least one value");
  const int64_t hw = s.sizes[static_cast<size_t>(i) % s.sizes.size()];
  const int64_t chw = s.cond_latent_size > 0 ? s.cond_latent_size : hw;
  check_input(hw >= 2 && hw % 2 == 0 && chw >= 2 && chw % 2 == 0, "synth-data: latent sizes must be even and >= 2");
  auto gen = cpu_generator(derive_seed(s.seed, RngPurpose::Synthetic, 0, static_cast<uint64_t>(i)));
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Sample out;
  out.index = i;
  at::Tensor target = at::zeros({s.latent_channels, chw, chw}, f64);
  for (int64_t k = 0; k < s.num_conditions; ++k) {
    at::Tensor c = smooth_field(s.latent_channels, chw, chw, gen);
    auto [perm, sign] = channel_map(s, k);
    at::Tensor mapped = c.index_select(0, at::tensor(perm, at::kLong)) * at::tensor(sign, f64).view({-1, 1, 1});
    target = target + mapped;
    out.conds.push_back(c.to(s.latent_dtype));
    out.cond_paths.push_back("synthetic://" + std::to_string(i) + "/cond_" + std::to_string(k));
  }
  if (s.num_conditions > 0) {
    target = target / static_cast<double>(s.num_conditions);
  } else {
    target = smooth_field(s.latent_channels, chw, chw, gen);  // nothing to predict it from
  }
  if (chw != hw) target = at::upsample_bilinear2d(target.unsqueeze(0), {hw, hw}, true)[0];
  out.target = (target * s.target_scale).to(s.latent_dtype);
  out.t5 = at::randn({s.text_len, s.text_dim}, gen, f64).to(s.embed_dtype);
  out.pooled = at::randn({s.pooled_dim}, gen, f64).to(s.embed_dtype);
  out.caption = "synthetic sample " + std::to_string(i);
  out.target_path = "synthetic://" + std::to_string(i) + "/target";
  return out;
}

void write_synthetic_dataset(const std::string& path, const SynthSpec& s) {
  check_input(s.num_samples > 0, "synth-data: --num_samples must be positive");
  check_input(s.num_conditions >= 0, "synth-data: --num_conditions must be >= 0");
  check_input(s.cond_kind == "subject" || s.cond_kind == "spatial", "synth-data: --cond_kind must be subject or spatial");
  DatasetSpec spec;
  spec.latent_channels = s.latent_channels;
  spec.text_len = s.text_len;
  spec.text_dim = s.text_dim;
  spec.pooled_dim = s.pooled_dim;
  spec.cond_kinds.assign(static_cast<size_t>(s.num_conditions), s.cond_kind);
  spec.latent_dtype = s.latent_dtype;
  spec.embed_dtype = s.embed_dtype;
  DatasetWriter w(path, spec);
  for (int64_t i = 0; i < s.num_samples; ++i) w.add(synthetic_sample(s, i));
  w.finish();
}

}  // namespace fluxtrain
