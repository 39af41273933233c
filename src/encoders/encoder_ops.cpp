#include "encoders/encoder_ops.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace fluxtrain::encoder_ops {

at::ScalarType accum_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const at::ScalarType a = accum_dtype(x);
  return at::layer_norm(x.to(a), {x.size(-1)}, weight.to(a), bias.to(a), eps).to(x.scalar_type());
}

at::Tensor softmax(const at::Tensor& x) { return at::softmax(x.to(accum_dtype(x)), -1).to(x.scalar_type()); }

at::Tensor activation(const at::Tensor& x, const std::string& name) {
  if (name == "quick_gelu") return x * at::sigmoid(x * 1.702);
  if (name == "gelu") return at::gelu(x);
  if (name == "gelu_new" || name == "gelu_pytorch_tanh") return at::gelu(x, "tanh");
  if (name == "relu") return at::relu(x);
  throw Error("text encoder: activation '" + name + "' is not supported");
}

at::Tensor like(const at::Tensor& w, const at::Tensor& x) {
  return w.scalar_type() == x.scalar_type() ? w : w.to(x.scalar_type());
}

}  // namespace fluxtrain::encoder_ops
