// A small learnable synthetic dataset for the tiny model (`fluxtrain synth-data`).
//
// Each condition is a smooth random field (a 4x4 grid of N(0,1) values per channel, bilinearly
// upsampled, normalised to unit variance). The target is a fixed function of the conditions,
// the same for every sample: channel c of the target is sign_c * scale * cond[perm_c] (a signed
// channel permutation, averaged over conditions and resized to the target grid). So the
// condition predicts the target exactly and a condition LoRA can learn the mapping; T5 and CLIP
// embeddings are random per sample (they carry no information about the target).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "data/dataset.h"

namespace fluxtrain {

struct SynthSpec {
  int64_t num_samples = 64;
  int64_t latent_channels = 16;
  int64_t text_len = 16, text_dim = 32, pooled_dim = 16;  // tiny model widths
  std::vector<int64_t> sizes{16};   // target latent side, sample i uses sizes[i % n]
  int64_t cond_latent_size = 16;    // condition latent side (0 = same as the target's)
  int64_t num_conditions = 1;
  std::string cond_kind = "spatial";
  double target_scale = 1.5;        // target std relative to the unit-variance condition
  at::ScalarType latent_dtype = at::kFloat;
  at::ScalarType embed_dtype = at::kBFloat16;
  uint64_t seed = 0;
};

Sample synthetic_sample(const SynthSpec& spec, int64_t index);
void write_synthetic_dataset(const std::string& path, const SynthSpec& spec);

}  // namespace fluxtrain
