// Fused RoPE: one thread per (token row, 4 pairs); reads x once in its own dtype, rotates in
// float32, writes once. Rows are (b, head, l) with arbitrary strides; D is contiguous.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda_dtype.cuh"
#include "kernels/rope.h"

namespace fluxtrain::kernels {
namespace {


template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                            T* __restrict__ out, int64_t H, int64_t L, int64_t D2, int64_t sB, int64_t sH,
                            int64_t sL, int64_t total_pairs, float sign) {
  const int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (p >= total_pairs) return;
  const int64_t j = p % D2;
  const int64_t row = p / D2;  // (b, h, l) in output order
  const int64_t l = row % L;
  const int64_t h = (row / L) % H;
  const int64_t b = row / (L * H);
  const T* src = x + b * sB + h * sH + l * sL + 2 * j;
  const float x0 = to_f(src[0]), x1 = to_f(src[1]);
  const float c = cos_t[l * D2 + j], s = sign * sin_t[l * D2 + j];
  T* dst = out + row * 2 * D2 + 2 * j;
  dst[0] = from_f<T>(c * x0 - s * x1);
  dst[1] = from_f<T>(s * x0 + c * x1);
}

}  // namespace

at::Tensor rope_rotate_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rope_rotate_cuda: x must be [B, h, L, D] with contiguous D");
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0 && cos.size(0) == L && cos.size(1) == D / 2, "rope_rotate_cuda: cos/sin must be [L, D/2]");
  at::Tensor c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, L, D}, x.options());
  const int64_t pairs = B * H * L * (D / 2);
  if (pairs == 0) return out;
  const int threads = 256;
  const int64_t blocks = (pairs + threads - 1) / threads;
  auto stream = at::cuda::getCurrentCUDAStream();
  const float sign = inverse ? -1.f : 1.f;
#define FLUXTRAIN_ROPE_LAUNCH(T, AT)                                                                             \
  rope_kernel<T><<<blocks, threads, 0, stream>>>(reinterpret_cast<const T*>(x.data_ptr<AT>()), c.data_ptr<float>(), \
                                                 s.data_ptr<float>(), reinterpret_cast<T*>(out.data_ptr<AT>()), H, L, \
                                                 D / 2, x.stride(0), x.stride(1), x.stride(2), pairs, sign)
  switch (x.scalar_type()) {
    case at::kBFloat16: FLUXTRAIN_ROPE_LAUNCH(__nv_bfloat16, at::BFloat16); break;
    case at::kHalf: FLUXTRAIN_ROPE_LAUNCH(__half, at::Half); break;
    case at::kFloat: FLUXTRAIN_ROPE_LAUNCH(float, float); break;
    default: TORCH_CHECK(false, "rope_rotate_cuda: unsupported dtype ", x.scalar_type());
  }
#undef FLUXTRAIN_ROPE_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace fluxtrain::kernels
