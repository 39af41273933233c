#include "kernels/modulated_layer_norm.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>

namespace fluxtrain::kernels {
namespace {

constexpr double kEps = 1e-6;

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::array<at::Tensor, 3> modulated_layer_norm_forward_reference(const at::Tensor& x, const at::Tensor& shift,
                                                                 const at::Tensor& scale) {
  const auto acc = acc_type(x);
  at::Tensor xf = x.to(acc);
  at::Tensor mean = xf.mean(-1);
  at::Tensor xc = xf - mean.unsqueeze(-1);
  at::Tensor rstd = at::rsqrt(xc.pow(2).mean(-1) + kEps);  // biased variance
  at::Tensor y = (xc * rstd.unsqueeze(-1) * (scale.to(acc) + 1) + shift.to(acc)).to(x.scalar_type());
  return {y, mean, rstd};
}

std::array<at::Tensor, 3> modulated_layer_norm_backward_reference(const at::Tensor& dy, const at::Tensor& x,
                                                                  const at::Tensor& scale, const at::Tensor& mean,
                                                                  const at::Tensor& rstd, bool need_dx,
                                                                  bool need_dshift, bool need_dscale,
                                                                  const at::Tensor& dx_add) {
  const auto acc = mean.scalar_type();
  at::Tensor r = rstd.unsqueeze(-1);
  at::Tensor xhat = (x.to(acc) - mean.unsqueeze(-1)) * r;
  at::Tensor dyf = dy.to(acc);
  at::Tensor dx, dshift, dscale;
  if (need_dx) {
    at::Tensor g = dyf * (scale.to(acc) + 1);
    at::Tensor d = r * (g - g.mean(-1, true) - xhat * (g * xhat).mean(-1, true));
    if (dx_add.defined()) d = d + dx_add.to(acc);
    dx = d.to(x.scalar_type());
  }
  if (need_dshift) dshift = at::sum_to(dyf, scale.sizes()).to(scale.scalar_type());
  if (need_dscale) dscale = at::sum_to(dyf * xhat, scale.sizes()).to(scale.scalar_type());
  return {dx, dshift, dscale};
}

bool modulated_layer_norm_cuda_supported(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
#ifdef FLUXTRAIN_WITH_CUDA
  const auto dt = x.scalar_type();
  if (!x.is_cuda() || !(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat)) return false;
  if (x.dim() != 3 || x.size(2) == 0 || x.stride(2) != 1) return false;
  for (const at::Tensor* p : {&shift, &scale}) {
    if (!p->defined() || p->device() != x.device() || p->scalar_type() != dt || p->dim() != 3 ||
        p->size(0) != x.size(0) || p->size(1) != 1 || p->size(2) != x.size(2))
      return false;
  }
  return true;
#else
  (void)x, (void)shift, (void)scale;
  return false;
#endif
}

std::array<at::Tensor, 3> modulated_layer_norm_forward(const at::Tensor& x, const at::Tensor& shift,
                                                       const at::Tensor& scale) {
#ifdef FLUXTRAIN_WITH_CUDA
  if (modulated_layer_norm_cuda_supported(x, shift, scale)) return modulated_layer_norm_forward_cuda(x, shift, scale);
#endif
  return modulated_layer_norm_forward_reference(x, shift, scale);
}

std::array<at::Tensor, 3> modulated_layer_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                        const at::Tensor& scale, const at::Tensor& mean,
                                                        const at::Tensor& rstd, bool need_dx, bool need_dshift,
                                                        bool need_dscale, const at::Tensor& dx_add) {
#ifdef FLUXTRAIN_WITH_CUDA
  if (modulated_layer_norm_cuda_supported(x, scale, scale) && dy.is_cuda() && dy.sizes() == x.sizes() &&
      mean.scalar_type() == at::kFloat && (!dx_add.defined() || dx_add.sizes() == x.sizes()))
    return modulated_layer_norm_backward_cuda(dy, x, scale, mean, rstd, need_dx, need_dshift, need_dscale, dx_add);
#endif
  return modulated_layer_norm_backward_reference(dy, x, scale, mean, rstd, need_dx, need_dshift, need_dscale,
                                                 dx_add);
}

}  // namespace fluxtrain::kernels
