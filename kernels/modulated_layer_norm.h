// Modulated LayerNorm, FLUX's adaLN: y = LayerNorm(x) * (1 + scale) + shift, LayerNorm without
// affine parameters, eps 1e-6, statistics in float32 (float64 for float64 x).
//
// The unfused expression (addcmul(shift, layer_norm(x), 1 + scale)) is three kernels forward
// (layer_norm, 1 + scale, addcmul) and more backward, each a full pass over [B, L, H] memory.
// On the GPU this is one pass forward (one block per row) and, backward, one pass for dx plus
// one column-reduction pass for dshift/dscale (only when they are needed).
//
// Rounding: the fused forward rounds once (the float32 value of xhat * (1 + scale) + shift is
// rounded to x's dtype); the unfused expression rounds LayerNorm's output and 1 + scale to x's
// dtype first. For float32/float64 the two agree to rounding level; for bf16 they can differ by
// one bf16 ulp, the fused one being the closer to the exact value.
#pragma once
#include <array>

#include <ATen/core/Tensor.h>

namespace fluxtrain::kernels {

// Forward. x: [B, L, H] (any strides, last dim contiguous on the GPU path); shift, scale:
// [B, 1, H] of x's dtype. Returns {y [B, L, H] contiguous in x's dtype, mean [B, L], rstd [B, L]}
// (mean/rstd in float32, float64 for float64 x): what the backward needs besides x and scale.
std::array<at::Tensor, 3> modulated_layer_norm_forward(const at::Tensor& x, const at::Tensor& shift,
                                                       const at::Tensor& scale);
// Backward: {dx, dshift, dscale}; each only computed when its flag is set (undefined otherwise).
// dx: [B, L, H] in x's dtype; dshift, dscale: [B, 1, H] in scale's dtype (float32 sums over L).
//   xhat = (x - mean) * rstd,  g = dy * (1 + scale)
//   dx = rstd * (g - mean_H(g) - xhat * mean_H(g * xhat))  (+ dx_add)
//   dshift = sum_L dy,  dscale = sum_L dy * xhat
// dx_add (optional, [B, L, H]): another gradient of x, added before dx is rounded (x feeding a
// residual as well as the norm: the sum autograd would otherwise make in a separate pass).
std::array<at::Tensor, 3> modulated_layer_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                        const at::Tensor& scale, const at::Tensor& mean,
                                                        const at::Tensor& rstd, bool need_dx, bool need_dshift,
                                                        bool need_dscale, const at::Tensor& dx_add = {});

// The plain ATen versions (any device; what CPU runs use and the tests' reference).
std::array<at::Tensor, 3> modulated_layer_norm_forward_reference(const at::Tensor& x, const at::Tensor& shift,
                                                                 const at::Tensor& scale);
std::array<at::Tensor, 3> modulated_layer_norm_backward_reference(const at::Tensor& dy, const at::Tensor& x,
                                                                  const at::Tensor& scale, const at::Tensor& mean,
                                                                  const at::Tensor& rstd, bool need_dx,
                                                                  bool need_dshift, bool need_dscale,
                                                                  const at::Tensor& dx_add = {});

// Whether the CUDA kernels take these arguments (CUDA tensors, x of bf16/fp16/fp32 with a
// contiguous last dim, shift/scale [B, 1, H] of x's dtype). The dispatchers above use the
// reference otherwise.
bool modulated_layer_norm_cuda_supported(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale);

#ifdef FLUXTRAIN_WITH_CUDA
std::array<at::Tensor, 3> modulated_layer_norm_forward_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                            const at::Tensor& scale);
std::array<at::Tensor, 3> modulated_layer_norm_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& scale, const at::Tensor& mean,
                                                             const at::Tensor& rstd, bool need_dx, bool need_dshift,
                                                             bool need_dscale, const at::Tensor& dx_add = {});
#endif

}  // namespace fluxtrain::kernels
