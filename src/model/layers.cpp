#include "model/layers.h"

#include <cmath>
#include <cstdlib>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "kernels/fp8.h"
#include "kernels/modulated_layer_norm.h"
#include "model/lora_linear.h"

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

at::Tensor fp8_scale_of(const TensorMap& w, const std::string& weight_name) {
  auto s = w.find(weight_name + kernels::kFp8ScaleSuffix);
  return s == w.end() ? at::Tensor() : s->second;
}

at::Tensor linear(const at::Tensor& x, const TensorMap& w, const std::string& prefix) {
  auto b = w.find(prefix + ".bias");
  return frozen_linear(x, w.at(prefix + ".weight"), b == w.end() ? at::Tensor() : b->second,
                       fp8_scale_of(w, prefix + ".weight"));
}

at::Tensor mlp_embedder(const at::Tensor& x, const TensorMap& g, const std::string& prefix) {
  return linear(at::silu(linear(x, g, prefix + ".in_layer")), g, prefix + ".out_layer");
}

at::Tensor layer_norm(const at::Tensor& x) {
  return at::layer_norm(x, {x.size(-1)}, {}, {}, 1e-6);
}

namespace {

// RMSNorm with a hand-written backward: saves x and the per-row 1/rms (float32) instead of
// the float32 copies of x that the op-by-op graph would keep for every q and k.
//   y = (x * r) * s,  r = 1/sqrt(mean(x^2) + eps)
//   dx = r * (g - xhat * mean(g * xhat)),  g = dy * s,  xhat = x * r
//   ds = sum over rows of dy * xhat
struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale) {
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor xf = x.to(acc);
    at::Tensor r = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + 1e-6);
    ctx->save_for_backward({x, scale, r});
    return (xf * r).to(x.scalar_type()) * scale;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &scale = s[1], &r = s[2];
    const auto acc = r.scalar_type();
    at::Tensor dy = grads[0].to(acc);
    at::Tensor xhat = x.to(acc) * r;
    at::Tensor g = dy * scale.to(acc);
    at::Tensor dx = (r * (g - xhat * (g * xhat).mean(-1, true))).to(x.scalar_type());
    at::Tensor ds;
    if (scale.requires_grad()) ds = (dy * xhat).reshape({-1, scale.numel()}).sum(0).view(scale.sizes()).to(scale.scalar_type());
    return {dx, ds};
  }
};

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& scale) {
  // On the GPU ATen's fused kernel (one launch forward, one backward, saving x and 1/rms);
  // elsewhere the hand-written function above.
  if (x.is_cuda()) return at::rms_norm(x, {x.size(-1)}, scale, 1e-6);
  return RmsNormFunction::apply(x, scale);
}

at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& scale) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor xf = x.to(acc);
  at::Tensor rrms = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + 1e-6);
  return (xf * rrms).to(x.scalar_type()) * scale;
}

namespace {

// y = LayerNorm(x) * (1 + scale) + shift in one kernel (kernels/modulated_layer_norm.h).
// Backward from x, scale and the saved float32 row statistics; each input's gradient only when
// autograd needs it (shift/scale need one when, e.g., a text-encoder adapter feeds the pooled
// vector; x practically always).
struct ModulatedLayerNormFunction : public torch::autograd::Function<ModulatedLayerNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& shift,
                            const at::Tensor& scale) {
    auto [y, mean, rstd] = kernels::modulated_layer_norm_forward(x, shift, scale);
    ctx->save_for_backward({x, scale, mean, rstd});
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto [dx, dshift, dscale] =
        kernels::modulated_layer_norm_backward(grads[0], s[0], s[1], s[2], s[3], ctx->needs_input_grad(0),
                                               ctx->needs_input_grad(1), ctx->needs_input_grad(2));
    return {dx, dshift, dscale};
  }
};

// The same with x also returned, for the residual it feeds: outputs {x (a view), y}. Backward adds
// the residual's gradient to the norm's inside the dx kernel (dx_add), so the sum of x's two
// gradients takes no separate pass over [B, L, H] (autograd's accumulation of a tensor used twice).
struct ModulatedLayerNormResidualFunction : public torch::autograd::Function<ModulatedLayerNormResidualFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& shift, const at::Tensor& scale) {
    auto [y, mean, rstd] = kernels::modulated_layer_norm_forward(x, shift, scale);
    ctx->save_for_backward({x, scale, mean, rstd});
    return {x, y};  // an input returned unmodified: autograd makes it a view with this node as history
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor& dres = grads[0];
    const at::Tensor& dy = grads[1];
    if (!dy.defined()) return {dres, at::Tensor(), at::Tensor()};
    auto s = ctx->get_saved_variables();
    auto [dx, dshift, dscale] =
        kernels::modulated_layer_norm_backward(dy, s[0], s[1], s[2], s[3], ctx->needs_input_grad(0),
                                               ctx->needs_input_grad(1), ctx->needs_input_grad(2), dres);
    return {dx, dshift, dscale};
  }
};

struct GatedResidualFunction : public torch::autograd::Function<GatedResidualFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& r, const at::Tensor& gate,
                            const at::Tensor& y) {
    ctx->save_for_backward({gate, gate.requires_grad() ? y : at::Tensor()});
    ctx->set_materialize_grads(false);
    return at::addcmul(r, gate, y);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor& dout = grads[0];
    if (!dout.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    auto s = ctx->get_saved_variables();
    at::Tensor dgate;
    if (ctx->needs_input_grad(1)) dgate = (dout * s[1]).sum_to_size(s[0].sizes());
    return {ctx->needs_input_grad(0) ? dout : at::Tensor(), dgate,
            ctx->needs_input_grad(2) ? dout * s[0] : at::Tensor()};
  }
};

}  // namespace

at::Tensor gated_residual(const at::Tensor& r, const at::Tensor& gate, const at::Tensor& y) {
  return GatedResidualFunction::apply(r, gate, y);
}

bool fused_kernels_enabled() {
  static const bool enabled = [] {
    const char* e = std::getenv("FLUXTRAIN_FUSED_KERNELS");
    return !(e && e[0] == '0');
  }();
  return enabled;
}

at::Tensor modulate_fused(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  return ModulatedLayerNormFunction::apply(x, shift, scale);
}

at::Tensor modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  if (x.is_cuda() && fused_kernels_enabled() && kernels::modulated_layer_norm_cuda_supported(x, shift, scale))
    return modulate_fused(x, shift, scale);
  return at::addcmul(shift, layer_norm(x), 1 + scale);
}

std::array<at::Tensor, 2> modulate_residual_fused(const at::Tensor& x, const at::Tensor& shift,
                                                  const at::Tensor& scale) {
  auto out = ModulatedLayerNormResidualFunction::apply(x, shift, scale);
  return {out[0], out[1]};
}

std::array<at::Tensor, 2> modulate_residual(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  if (x.is_cuda() && fused_kernels_enabled() && kernels::modulated_layer_norm_cuda_supported(x, shift, scale))
    return modulate_residual_fused(x, shift, scale);
  return {x, modulate(x, shift, scale)};
}

}  // namespace fluxtrain
