// Fused fp8 e4m3 dequantisation: one byte read, one float32 multiply by the row's (or the
// tensor's) scale, one rounding to the output dtype. The e4m3 byte is decoded from its
// definition (sign, 4-bit exponent with bias 7, 3-bit mantissa, subnormals at exponent 0,
// S.1111.111 = NaN), which is exact in float32, so the result equals the CPU reference's
// float32(q) * scale rounded the same way.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda_dtype.cuh"
#include "kernels/fp8.h"

namespace fluxtrain::kernels {
namespace {

__device__ inline float decode_e4m3(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80) << 24;
  const uint32_t e = (b >> 3) & 0xF, m = b & 0x7;
  if (e == 0xF && m == 0x7) return __int_as_float(0x7FC00000 | sign);
  if (e == 0) return __int_as_float(__float_as_int(static_cast<float>(m) * 0.001953125f) | sign);  // m * 2^-9
  return __int_as_float(static_cast<int>(sign | ((e + 120) << 23) | (m << 20)));  // exponent e - 7 + 127
}

template <typename T>
__global__ void dequant_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale, T* __restrict__ out,
                               int64_t n, int64_t cols, bool per_row) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float s = scale[per_row ? i / cols : 0];
    out[i] = from_f<T>(decode_e4m3(q[i]) * s);
  }
}

// 16 codes per thread (one 16-byte load, 16-element stores), when the row length is a multiple
// of 16 and the pointers are aligned: a row's scale then holds for the whole chunk. The byte-wise
// kernel above moved about a third of the memory bandwidth.
template <typename T>
__global__ void dequant16_kernel(const uint4* __restrict__ q, const float* __restrict__ scale, T* __restrict__ out,
                                 int64_t chunks, int64_t row_chunks, bool per_row) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float s = scale[per_row ? i / row_chunks : 0];
    const uint4 w = q[i];
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    Vec8<T> lo, hi;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      lo.v[e] = from_f<T>(decode_e4m3(static_cast<uint8_t>(words[e / 4] >> (8 * (e % 4)))) * s);
      hi.v[e] = from_f<T>(decode_e4m3(static_cast<uint8_t>(words[2 + e / 4] >> (8 * (e % 4)))) * s);
    }
    store8(out + 16 * i, lo);
    store8(out + 16 * i + 8, hi);
  }
}

}  // namespace

void fp8_dequantise_cuda_into(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out) {
  TORCH_CHECK(q.is_cuda() && out.is_cuda() && scale.is_cuda(), "fp8_dequantise_cuda_into: CUDA tensors expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat8_e4m3fn && scale.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == q.sizes() && q.dim() >= 1 && (scale.numel() == 1 || scale.numel() == q.size(0)),
              "fp8_dequantise_cuda_into: bad arguments");
  at::Tensor qc = q.contiguous(), sc = scale.contiguous();
  const int64_t n = qc.numel();
  if (n == 0) return;
  const int64_t cols = n / q.size(0);
  const bool per_row = sc.numel() != 1 || q.size(0) == 1;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535LL * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* qp = reinterpret_cast<const uint8_t*>(qc.data_ptr());
  const bool vec16 = cols % 16 == 0 && reinterpret_cast<uintptr_t>(qp) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(out.data_ptr()) % (16 * out.element_size()) == 0;
  const int64_t chunks = n / 16, vblocks = std::min<int64_t>((chunks + threads - 1) / threads, 65535LL * 8);
#define FLUXTRAIN_FP8_LAUNCH(T, AT)                                                                                   \
  if (vec16)                                                                                                          \
    dequant16_kernel<T><<<vblocks, threads, 0, stream>>>(reinterpret_cast<const uint4*>(qp), sc.data_ptr<float>(),    \
                                                         reinterpret_cast<T*>(out.data_ptr<AT>()), chunks, cols / 16, \
                                                         per_row);                                                    \
  else                                                                                                                \
    dequant_kernel<T><<<blocks, threads, 0, stream>>>(qp, sc.data_ptr<float>(), reinterpret_cast<T*>(out.data_ptr<AT>()), n, cols, per_row)
  switch (out.scalar_type()) {
    case at::kBFloat16: FLUXTRAIN_FP8_LAUNCH(__nv_bfloat16, at::BFloat16); break;
    case at::kHalf: FLUXTRAIN_FP8_LAUNCH(__half, at::Half); break;
    case at::kFloat: FLUXTRAIN_FP8_LAUNCH(float, float); break;
    default: TORCH_CHECK(false, "fp8_dequantise_cuda_into: unsupported output dtype ", out.scalar_type());
  }
#undef FLUXTRAIN_FP8_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fluxtrain::kernels
