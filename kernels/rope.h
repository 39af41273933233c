// Rotary position embedding, the FLUX way: pairs (x[2j], x[2j+1]) of each head vector rotated
// by the token's angle for pair j. One fused pass on the GPU (read x once, write once, math in
// float32) instead of upcast + complex multiply + downcast through memory; the CPU reference is
// the plain ATen formula and is what CPU runs use.
#pragma once
#include <ATen/core/Tensor.h>

namespace fluxtrain::kernels {

// x: [B, heads, L, D] (any strides, last dim contiguous); cos, sin: [L, D/2] (float32, or float64
// for float64 x). inverse = rotate by the opposite angle (the backward of the rotation).
// Returns a contiguous [B, heads, L, D] tensor of x's dtype.
at::Tensor rope_rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse);
at::Tensor rope_rotate_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse);

#ifdef FLUXTRAIN_WITH_CUDA
at::Tensor rope_rotate_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse);
#endif

}  // namespace fluxtrain::kernels
