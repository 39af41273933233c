// Rectified-flow (flow-matching) training objective, as EasyControl trains FLUX:
//   x_t    = (1 - sigma) * x + sigma * noise
//   target = noise - x
//   loss   = mean over samples of mean((pred - target)^2), reduced in float32 (float64 stays float64)
// Latents are VAE latents [C, h, w] (already shifted/scaled by the encoder); the transformer sees
// them packed into 2x2 patches: [B, C, h, w] -> [B, (h/2)(w/2), 4C], channel order c*4 + dy*2 + dx
// (diffusers' FluxPipeline._pack_latents).
#pragma once
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fluxtrain {

at::Tensor pack_latents(const at::Tensor& x);                         // [B,C,h,w] -> [B,L,4C]
at::Tensor unpack_latents(const at::Tensor& x, int64_t h, int64_t w);  // inverse

// Noise for one sample: N(0,1) float32 of `shape` from the generator seeded by
// (seed, Noise, epoch, sample_index); bit-identical whatever batch or rank it lands in.
at::Tensor sample_noise(const std::vector<int64_t>& shape, uint64_t seed, uint64_t epoch, uint64_t sample_index);

// sigma: [B] (any float dtype); x, noise: [B, ...]. Computed in the dtype of x.
at::Tensor noisy_latents(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& sigma);
at::Tensor flow_target(const at::Tensor& x, const at::Tensor& noise);

// Per-sample mean squared error [B]; reduction in float32, or float64 for float64 inputs.
at::Tensor per_sample_mse(const at::Tensor& pred, const at::Tensor& target);

}  // namespace fluxtrain
