// The input gradient of a frozen linear whose input is a tanh-GELU, in one GEMM:
//
//   dpre = (dy @ w) * gelu_tanh'(pre)        dy [M, O], w [O, N] (columns of a linear's weight
//                                            [O, In], any row stride), pre [M, N] (any row stride)
//
// where gelu_tanh(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the GELU of FLUX's MLPs.
// Unfused this is a GEMM writing dy @ w ([M, N], 4x the hidden size wide in FLUX's MLPs) and an
// elementwise kernel reading it back with pre and writing dpre: two extra passes over the widest
// activation of the block. On CUDA, cuBLASLt's DGELU epilogue applies the derivative to the
// float32 accumulator inside the GEMM (reading pre as its auxiliary input) and writes dpre once.
// Rounding: the fused product rounds once (dy @ w is not rounded to the dtype before the
// derivative is applied); the unfused one rounds twice. Both are within one ulp of the exact
// value for bf16/fp16.
//
// Paths: cuBLASLt (CUDA, bf16/fp16/fp32, 16-byte aligned operands with leading dimensions that
// are multiples of 8, at least one row, a heuristic that takes the epilogue) and the reference
// (any device): at::gelu_backward(dy @ w, pre, "tanh"). FLUXTRAIN_DGELU_EPILOGUE=0 takes the
// reference on CUDA too (for A/B measurements: cuBLASLt runs this epilogue on its xmma kernels,
// not on the nvjet kernels it picks for the plain product).
#pragma once
#include <ATen/core/Tensor.h>

namespace fluxtrain::kernels {

// dy: [M, O]; w: [O, N] with a contiguous last dim; pre: [M, N] with a contiguous last dim.
// Returns dpre [M, N] contiguous, in dy's dtype.
at::Tensor matmul_dgelu(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& pre);

// Whether the cuBLASLt path is enabled (FLUXTRAIN_DGELU_EPILOGUE, read once; default on).
bool matmul_dgelu_epilogue_enabled();

// The reference (what CPU runs use).
at::Tensor matmul_dgelu_reference(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& pre);

// Whether the cuBLASLt path takes these operands (it may still decline at run time, when no
// algorithm supports the epilogue; matmul_dgelu then uses the reference).
bool matmul_dgelu_cuda_supported(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& pre);

#ifdef FLUXTRAIN_WITH_CUDA
// The cuBLASLt product; returns an undefined tensor when cuBLASLt declines.
at::Tensor matmul_dgelu_cuda(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& pre);
#endif

}  // namespace fluxtrain::kernels
