#include "model/layers.h"

#include <cmath>

#include <ATen/ATen.h>

namespace fluxtrain {

at::Tensor timestep_embedding(const at::Tensor& t, int64_t dim, at::ScalarType out_dtype) {
  // Computed in float32 (float64 when the model runs in float64) for accuracy at t*1000.
  const auto acc = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t half = dim / 2;
  at::Tensor freqs = at::exp(-std::log(10000.0) *
                             at::arange(half, t.options().dtype(acc)) / static_cast<double>(half));
  at::Tensor args = (t.to(acc) * 1000.0).unsqueeze(1) * freqs.unsqueeze(0);
  return at::cat({at::cos(args), at::sin(args)}, 1).to(out_dtype);
}

at::Tensor linear(const at::Tensor& x, const TensorMap& w, const std::string& prefix) {
  auto b = w.find(prefix + ".bias");
  return at::linear(x, w.at(prefix + ".weight"), b == w.end() ? at::Tensor() : b->second);
}

at::Tensor mlp_embedder(const at::Tensor& x, const TensorMap& g, const std::string& prefix) {
  return linear(at::silu(linear(x, g, prefix + ".in_layer")), g, prefix + ".out_layer");
}

at::Tensor layer_norm(const at::Tensor& x) {
  return at::layer_norm(x, {x.size(-1)}, {}, {}, 1e-6);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& scale) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor xf = x.to(acc);
  at::Tensor rrms = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + 1e-6);
  return (xf * rrms).to(x.scalar_type()) * scale;
}

at::Tensor modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  return at::addcmul(shift, layer_norm(x), 1 + scale);
}

}  // namespace fluxtrain
