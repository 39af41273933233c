// float <-> storage dtype conversions shared by the CUDA kernels in kernels/*.cu. Conversions
// to bf16/fp16 round to nearest even (the _rn intrinsics: the same rounding as ATen's casts, which
// the CPU references use); round_to<T> is a value rounded to T and read back (identity for float).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fluxtrain::kernels {

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

// Eight consecutive elements, read and written with one 16-byte access (two for float32): the
// vector kernels' unit (kernels/modulated_layer_norm.cu, kernels/qk_norm_rope.cu). Callers check
// that the address is aligned to 8 elements.
constexpr int kVec8 = 8;

template <typename T>
struct alignas(kVec8 * sizeof(T)) Vec8 {
  T v[kVec8];
};

template <typename T>
__device__ __forceinline__ Vec8<T> load8(const T* p) { return *reinterpret_cast<const Vec8<T>*>(p); }
template <typename T>
__device__ __forceinline__ void store8(T* p, const Vec8<T>& x) { *reinterpret_cast<Vec8<T>*>(p) = x; }
template <typename T>
__device__ __forceinline__ Vec8<T> zero8() {
  Vec8<T> z;
#pragma unroll
  for (int e = 0; e < kVec8; ++e) z.v[e] = from_f<T>(0.f);
  return z;
}

}  // namespace fluxtrain::kernels
