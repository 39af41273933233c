// fp8 e4m3 ("e4m3fn": 4 exponent bits, bias 7, 3 mantissa bits, no infinities, one NaN pattern
// per sign, largest finite 448) storage for frozen linear weights, with float32 scales per
// output channel (row of a [out, in] weight) or per tensor.
//
// Quantise (at load; ATen ops, any device): scale = amax / 448 over the finite values of the
// row (tensor), 1 where that amax is 0; q = e4m3(clamp(float32(w) / scale, -448, 448)), rounded
// to nearest, ties to even. So finite values and infinities saturate at +-448 * scale instead of
// becoming NaN, and NaN stays NaN.
// Dequantise (on every acquire): out = cast(float32(q) * scale) -- one float32 multiply and one
// rounding to the output dtype, the same on the CPU reference and the CUDA kernel, so that both
// give the same bits.
#pragma once
#include <ATen/core/Tensor.h>

namespace fluxtrain::kernels {

enum class Fp8Scaling { PerChannel, PerTensor };

constexpr double kE4m3Max = 448.0;

// The stored form of a quantised weight in a block's TensorMap: the weight's own name holds the
// e4m3 codes and name + kFp8ScaleSuffix its float32 scales. Here, not in dist/, because the model
// reads it too when it multiplies the stored form directly (--fp8_matmul, kernels/fp8_matmul.h).
inline constexpr const char* kFp8ScaleSuffix = ":fp8_scale";

struct Fp8Tensor {
  at::Tensor data;   // Float8_e4m3fn, the weight's shape
  at::Tensor scale;  // float32: [rows] per channel, [1] per tensor
};

// w: a 2-D (or higher: rows = size(0)) floating tensor on any device.
Fp8Tensor fp8_quantise(const at::Tensor& w, Fp8Scaling scaling);

// Writes the dequantised weight into out (contiguous, q's shape, a floating dtype, q's device).
// CUDA tensors (GPU build) go through the fused kernel, everything else through the reference.
void fp8_dequantise_into(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out);
at::Tensor fp8_dequantise(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype);
void fp8_dequantise_reference_into(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out);

#ifdef FLUXTRAIN_WITH_CUDA
// Same contract as fp8_dequantise_into; out: bf16, f16 or f32.
void fp8_dequantise_cuda_into(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out);
#endif

}  // namespace fluxtrain::kernels
