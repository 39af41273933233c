#include "kernels/fp8.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace fluxtrain::kernels {
namespace {

void check_pair(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& out) {
  if (q.scalar_type() != at::kFloat8_e4m3fn || scale.scalar_type() != at::kFloat || !out.is_contiguous() ||
      out.sizes() != q.sizes() || !at::isFloatingType(out.scalar_type()) || out.device() != q.device() ||
      scale.device() != q.device() || q.dim() < 1 || (scale.numel() != 1 && scale.numel() != q.size(0)))
    throw Error("fp8 dequantise: expected e4m3 data, float32 scales ([rows] or [1]) and a contiguous output of the "
                "same shape on the same device",
                ErrorKind::Internal);
}

}  // namespace

Fp8Tensor fp8_quantise(const at::Tensor& w, Fp8Scaling scaling) {
  if (w.dim() < 1 || !at::isFloatingType(w.scalar_type()))
    throw Error("fp8 quantise: expected a floating tensor with at least one dimension", ErrorKind::Internal);
  at::Tensor x = w.detach().to(at::kFloat).contiguous();
  const int64_t rows = x.size(0);
  at::Tensor mag = at::where(at::isfinite(x), x.abs(), at::zeros({}, x.options()));
  at::Tensor amax = scaling == Fp8Scaling::PerChannel ? mag.reshape({rows, -1}).amax(1)
                                                      : mag.reshape({1, -1}).amax(1);
  if (x.numel() == 0) amax = at::zeros({scaling == Fp8Scaling::PerChannel ? rows : 1}, x.options());
  at::Tensor scale = amax / static_cast<float>(kE4m3Max);
  scale = at::where(scale > 0, scale, at::ones({}, scale.options()));
  std::vector<int64_t> bshape(x.dim(), 1);
  bshape[0] = scaling == Fp8Scaling::PerChannel ? rows : 1;
  at::Tensor scaled = (x / scale.reshape(bshape)).clamp(-kE4m3Max, kE4m3Max);  // clamp keeps NaN
  return {scaled.to(at::kFloat8_e4m3fn), scale};
}

void fp8_dequantise_reference_into(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out) {
  check_pair(q, scale, out);
  std::vector<int64_t> bshape(q.dim(), 1);
  bshape[0] = scale.numel();
  out.copy_((q.to(at::kFloat) * scale.reshape(bshape)).to(out.scalar_type()));
}

void fp8_dequantise_into(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out) {
#ifdef FLUXTRAIN_WITH_CUDA
  const at::ScalarType t = out.scalar_type();
  if (q.is_cuda() && (t == at::kBFloat16 || t == at::kHalf || t == at::kFloat))
    return fp8_dequantise_cuda_into(q, scale, out);
#endif
  fp8_dequantise_reference_into(q, scale, out);
}

at::Tensor fp8_dequantise(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype) {
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  fp8_dequantise_into(q, scale, out);
  return out;
}

}  // namespace fluxtrain::kernels
