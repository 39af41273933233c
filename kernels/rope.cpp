#include "kernels/rope.h"

#include <ATen/ATen.h>

namespace fluxtrain::kernels {

at::Tensor rope_rotate_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  auto shape = x.sizes().vec();
  at::Tensor xf = x.to(cos.scalar_type()).reshape({shape[0], shape[1], shape[2], shape[3] / 2, 2});
  at::Tensor x0 = xf.select(-1, 0), x1 = xf.select(-1, 1);
  at::Tensor s = inverse ? -sin : sin;
  return at::stack({cos * x0 - s * x1, s * x0 + cos * x1}, -1).reshape(shape).to(x.scalar_type());
}

at::Tensor rope_rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
#ifdef FLUXTRAIN_WITH_CUDA
  if (x.is_cuda() && x.scalar_type() != at::kDouble) return rope_rotate_cuda(x, cos, sin, inverse);
#endif
  return rope_rotate_reference(x, cos, sin, inverse);
}

}  // namespace fluxtrain::kernels
