// Position ids (3 axes: index, row, col) for the packed latent grids, as EasyControl builds them.
#pragma once
#include <cstdint>
#include <ATen/core/Tensor.h>

namespace fluxtrain {

// Noise tokens: (0, row, col) for a grid of h x w packed tokens (latent/2).
at::Tensor noise_position_ids(int64_t h, int64_t w);
// Subject condition: the condition's own grid, rows offset by +64.
at::Tensor subject_position_ids(int64_t cond_h, int64_t cond_w);
// Spatial condition: the condition grid stretched onto the noise grid:
// (0, row * noise_h / cond_h, col * noise_w / cond_w), fractional.
at::Tensor spatial_position_ids(int64_t cond_h, int64_t cond_w, int64_t noise_h, int64_t noise_w);
// Text tokens: zeros [T, 3].
at::Tensor text_position_ids(int64_t t);

}  // namespace fluxtrain
