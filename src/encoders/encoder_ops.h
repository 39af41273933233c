// Small tensor functions shared by the text encoders.
#pragma once
#include <string>

#include <ATen/core/Tensor.h>

namespace fluxtrain::encoder_ops {

// The dtype norms and softmax run in: float64 stays float64, anything else runs in float32.
at::ScalarType accum_dtype(const at::Tensor& x);
// LayerNorm over the last dim in the accumulation dtype, result in x's dtype.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);
// Softmax over the last dim in the accumulation dtype, result in x's dtype.
at::Tensor softmax(const at::Tensor& x);
// transformers' activations by name: quick_gelu, gelu (erf), gelu_new / gelu_pytorch_tanh (tanh), relu.
at::Tensor activation(const at::Tensor& x, const std::string& name);
// Casts a frozen weight to x's dtype when they differ (weights are stored in the compute dtype;
// float64 runs on float32 weights in tests).
at::Tensor like(const at::Tensor& w, const at::Tensor& x);

}  // namespace fluxtrain::encoder_ops
