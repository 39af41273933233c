// The operands of a scaled fp8 GEMM, made in one pass each (kernels/fp8_matmul.h):
//   rows:      x [M, K] (bf16/f16/f32, times a float32 column scale when given; or the
//              concatenation [x0 | x1] of two such matrices, read in place) -> e4m3 codes and
//              one float32 scale per row, the same bits as fp8_quantise_rows' ATen form
//              (s = max(amax / 448, FLT_MIN), r = 1 / s and x * r each rounded once in float32,
//              the code rounded to nearest even; |x * r| <= 448 + a few ulp: nothing saturates).
//              A multiply by the reciprocal, not a division: an IEEE float32 division is a
//              sequence of some twenty instructions, and with it (and two passes over each row)
//              the quantiser moved only about 1.5 TB/s at 512/1024/128 (30 ms for some 15 G
//              elements per step, H200). The row is held in registers (one read), up to 24576
//              bf16 elements; longer rows are read twice (the second time from L2).
//              The ATen form costs an inf-norm kernel, a reciprocal, a multiply and, with a
//              column scale, a multiply into a float32 copy.
//              With gelu_from < K, the columns from gelu_from on enter as FLUX's tanh-GELU of
//              their values rounded to the input dtype (what at::gelu(x, "tanh") writes), made
//              on the fly: the forward of an MLP's down projection reads the pre-activation once
//              and writes only codes, instead of a GELU kernel writing the activation and the
//              quantiser reading it again.
//              With an auxiliary matrix pre (gelu_grad_of), the row entering is GELU's backward,
//              x * gelu_tanh'(pre) rounded to the input dtype (what at::gelu_backward(x, pre,
//              "tanh") writes): the input gradient of an MLP's up projection reads the gradient
//              of GELU's output and the pre-activation once and writes only codes, instead of a
//              GELU backward kernel writing the pre-activation's gradient (6.6 ms per step at
//              512/1024/128, session 15) and the quantiser reading it again.
//              Both GELU entries evaluate ATen's formulas (tanhf) by default, the same bits as
//              ATen's kernels; fp8_fast_gelu() switches them to the logistic forms (below).
//   transpose: e4m3 codes [N, K] -> [K, N], through 64 x 64 byte tiles in shared memory with
//              4-byte accesses; ATen's byte transpose moved about 0.17 GB/ms.
#include <cfloat>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_fp8.h>

#include "kernels/cuda_dtype.cuh"
#include "kernels/fp8_matmul.h"

namespace fluxtrain::kernels {
namespace {

constexpr int kRowThreads = 256;     // the two-pass kernel's block
constexpr int kRegThreads = 128;     // the one-pass kernel's block
constexpr int kMaxRegVectors = 24;   // per thread: rows up to 128 * 24 * 8 = 24576 bf16 elements
// With GELU applied on the way (tanhf: a few dozen instructions per element), the row is spread
// over 4x the threads with a quarter of the registers each, so that twice as many warps per SM
// hide the arithmetic (at 128 threads and ~200 registers, the fused kernel ran slower than ATen's
// GELU kernel followed by the plain quantiser: 8.8 vs about 6.9 ms per step at 512/1024/128).
constexpr int kGeluThreads = 512;
constexpr int kMaxGeluVectors = 8;   // rows up to 512 * 8 * 8 = 32768 bf16 elements

__device__ __forceinline__ uint8_t e4m3_code(float v) {
  // Round to nearest even; SATFINITE is never reached (|v| <= 448 (+ a few ulp) by construction).
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

template <typename T, int V>
struct alignas(V * sizeof(T)) VecT {
  T v[V];
};

// tanh-GELU in float32 as ATen's CUDA kernel evaluates it (GeluCUDAKernelImpl: beta = sqrt(2/pi)
// and kappa = 0.044715 as float constants, x^3 as (x x) x, tanhf), rounded to T: the bits of
// at::gelu(x, "tanh") on the GPU, which the test checks.
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kBeta = M_SQRT2 * M_2_SQRTPI * 0.5;
  constexpr float kKappa = 0.044715;
  const float x_cube = x * x * x;
  const float inner = kBeta * (x + kKappa * x_cube);
  return 0.5f * x * (1.f + tanhf(inner));
}

// The logistic forms (fp8_fast_gelu(), kernels/fp8_matmul.h): 1 + tanh u = 2 / (1 + e^(-2u)), so
// that gelu(x) = x s and gelu'(x) = s + 2 x s (1 - s) u'(x) = s (1 + 2 x e s u'(x)), with
// e = e^(-2u), s = 1 / (1 + e) and 1 - s = e s: an __expf and an approximate reciprocal (a few
// instructions) instead of tanhf (some twenty, which left both GELU quantisers bound by
// arithmetic, not memory: session 16), and no cancellation in 1 + tanh u for negative u. The
// exponent is clamped at 80 (e^80 < FLT_MAX, far below __fdividef's 2^126 limit), where s and
// e s are already at their limits. (ptxas: no spills in the bf16 and float32 kernels; fp16's
// 512-thread gradient kernels spill some 40-60 bytes at 64 registers.)
__device__ __forceinline__ float gelu_fast(float x) {
  constexpr float kBeta = M_SQRT2 * M_2_SQRTPI * 0.5;
  constexpr float kKappa = 0.044715;
  const float u = kBeta * x * fmaf(kKappa, x * x, 1.f);
  return __fdividef(x, 1.f + __expf(fminf(-2.f * u, 80.f)));
}

__device__ __forceinline__ float gelu_grad_fast(float dy, float x) {
  constexpr float kBeta = M_SQRT2 * M_2_SQRTPI * 0.5;
  constexpr float kKappa = 0.044715;
  const float x2 = x * x;
  const float e = __expf(fminf(-2.f * kBeta * x * fmaf(kKappa, x2, 1.f), 80.f));
  const float s = __fdividef(1.f, 1.f + e);
  const float du = kBeta * fmaf(3.f * kKappa, x2, 1.f);
  return dy * s * fmaf(2.f * x * e * s, du, 1.f);
}

template <typename T, int V>
__device__ __forceinline__ void gelu_in_place(VecT<T, V>& a, bool fast) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float x = to_f(a.v[e]);
    a.v[e] = from_f<T>(fast ? gelu_fast(x) : gelu_tanh(x));
  }
}

// dy * gelu_tanh'(x) in float32 as ATen's CUDA kernel evaluates it (GeluBackwardCUDAKernelImpl,
// tanh: the derivative as 0.5 (1 + t) + 0.5 x (1 - t^2) beta (1 + 3 kappa x^2), with t the tanhf
// of the forward's inner value and 3 kappa folded into one float constant), rounded to T: the
// bits of at::gelu_backward(dy, x, "tanh") on the GPU, which the test checks.
__device__ __forceinline__ float gelu_tanh_grad(float dy, float x) {
  constexpr float kBeta = M_SQRT2 * M_2_SQRTPI * 0.5;
  constexpr float kKappa = 0.044715;
  const float x_sq = x * x;
  const float x_cube = x_sq * x;
  const float inner = kBeta * (x + kKappa * x_cube);
  const float t = tanhf(inner);
  const float left = 0.5f * x;
  const float right = 1.f + t;
  const float left_derivative = 0.5f * right;
  const float tanh_derivative = 1.f - t * t;
  const float inner_derivative = kBeta * (1.f + 3.f * kKappa * x_sq);
  const float right_derivative = left * tanh_derivative * inner_derivative;
  return dy * (left_derivative + right_derivative);
}

template <typename T, int V>
__device__ __forceinline__ void gelu_grad_in_place(VecT<T, V>& dy, const VecT<T, V>& x, bool fast) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float g = to_f(dy.v[e]), p = to_f(x.v[e]);
    dy.v[e] = from_f<T>(fast ? gelu_grad_fast(g, p) : gelu_tanh_grad(g, p));
  }
}

// The row's element block i * V .. i * V + V - 1: from the first source below k0, from the second
// above (k0 a multiple of V).
// Columns from gelu_from on (a multiple of V; >= k: none) are loaded as GELU of their values.
// aux (GELU's input, one source only; nullptr: none): every column is loaded as GELU's backward
// of its value (the gradient of GELU's output) at aux's value.
template <typename T, int V>
struct Sources {
  const T* x0;
  const T* x1;
  int64_t ld0, ld1, k0, gelu_from;
  const T* aux = nullptr;
  int64_t ld_aux = 0;
  bool fast_gelu = false;  // the logistic forms of GELU and its derivative (fp8_fast_gelu())
  __device__ __forceinline__ const T* at(int64_t row, int64_t i) const {
    const int64_t col = i * V;
    return col < k0 ? x0 + row * ld0 + col : x1 + row * ld1 + (col - k0);
  }
  __device__ __forceinline__ VecT<T, V> aux_at(int64_t row, int64_t i) const {
    return *reinterpret_cast<const VecT<T, V>*>(aux + row * ld_aux + i * V);
  }
  __device__ __forceinline__ VecT<T, V> load(int64_t row, int64_t i) const {
    VecT<T, V> a = *reinterpret_cast<const VecT<T, V>*>(at(row, i));
    if (aux != nullptr)
      gelu_grad_in_place(a, aux_at(row, i), fast_gelu);
    else if (i * V >= gelu_from)
      gelu_in_place(a, fast_gelu);
    return a;
  }
};

// What the one-pass kernel makes of the values it loads (a compile-time switch, so that the plain
// quantiser keeps its registers and occupancy): as they are, GELU from gelu_from on, or GELU's
// backward at aux; each GELU entry in ATen's form or the logistic one (a runtime choice there
// spilled the 512-thread kernels' registers).
enum class Entry { Plain, Gelu, GeluFast, GeluGrad, GeluGradFast };

// Column scales: none (cs nullptr), one value (n == 1) or one per column (vectors of V read at
// once when V is a multiple of 4).
struct ColScales {
  const float* cs;
  int n;
  template <int V>
  __device__ __forceinline__ void apply(float (&x)[V], int64_t i) const {
    if (cs == nullptr) return;
    if (n == 1) {
#pragma unroll
      for (int e = 0; e < V; ++e) x[e] = __fmul_rn(x[e], cs[0]);
    } else if constexpr (V % 4 == 0) {
#pragma unroll
      for (int e = 0; e < V; e += 4) {
        const float4 c = *reinterpret_cast<const float4*>(cs + i * V + e);
        x[e] = __fmul_rn(x[e], c.x), x[e + 1] = __fmul_rn(x[e + 1], c.y);
        x[e + 2] = __fmul_rn(x[e + 2], c.z), x[e + 3] = __fmul_rn(x[e + 3], c.w);
      }
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) x[e] = __fmul_rn(x[e], cs[i * V + e]);
    }
  }
};

// Block i of a row in float32, times its column scales. The one-pass kernel calls this twice per
// block (for the maximum, then for the codes): the row stays in registers in its own dtype, half
// the registers of float32, and the column scales are re-applied rather than kept.
template <typename T, int V>
__device__ __forceinline__ void scaled_floats(const VecT<T, V>& a, const ColScales& cs, int64_t i, float (&x)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) x[e] = to_f(a.v[e]);
  cs.apply(x, i);
}

template <int V>
__device__ __forceinline__ float abs_max(const float (&x)[V], float m) {
#pragma unroll
  for (int e = 0; e < V; ++e) m = fmaxf(m, fabsf(x[e]));
  return m;
}

template <int V>
__device__ __forceinline__ VecT<uint8_t, V> codes_of(const float (&x)[V], float r) {
  VecT<uint8_t, V> c;
#pragma unroll
  for (int e = 0; e < V; ++e) c.v[e] = e4m3_code(__fmul_rn(x[e], r));
  return c;
}

// The block's largest magnitude; thread 0 turns it into the row's scale s (written out) and
// every thread gets 1 / s.
template <int THREADS>
__device__ __forceinline__ float row_reciprocal(float amax, float* scales, int64_t row) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  __shared__ float warp_max[THREADS / 32];
  __shared__ float row_r;
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = warp_max[0];
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) m = fmaxf(m, warp_max[w]);
    const float s = fmaxf(__fdiv_rn(m, 448.f), FLT_MIN);
    scales[row] = s;
    row_r = __frcp_rn(s);
  }
  __syncthreads();
  return row_r;
}

// One block per row of the concatenation [x0 | x1], held in registers: every load of the row is
// issued before the reduction (NV vectors of V elements per thread, 16 bytes each), then the
// codes are written from the registers. Rows up to kRegThreads * kMaxRegVectors vectors.
// E (Entry): what the loaded values enter as.
template <typename T, int V, int NV, Entry E, int THREADS>
__global__ void __launch_bounds__(THREADS, E != Entry::Plain && NV <= 4 ? 2 : 1)
    quantise_rows_regs_kernel(Sources<T, V> src, int64_t k, ColScales cs, uint8_t* __restrict__ codes,
                              float* __restrict__ scales) {
  constexpr bool kFast = E == Entry::GeluFast || E == Entry::GeluGradFast;
  const int64_t row = blockIdx.x, nv = k / V;
  VecT<T, V> a[NV];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * THREADS;
    if (i < nv) a[j] = *reinterpret_cast<const VecT<T, V>*>(src.at(row, i));
  }
  if constexpr (E == Entry::GeluGrad || E == Entry::GeluGradFast) {  // GELU's input beside, all in flight
    VecT<T, V> b[NV];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * THREADS;
      if (i < nv) b[j] = src.aux_at(row, i);
    }
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * THREADS;
      if (i < nv) gelu_grad_in_place(a[j], b[j], kFast);
    }
  }
  if constexpr (E == Entry::Gelu || E == Entry::GeluFast) {  // after all loads are issued (in flight together)
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * THREADS;
      if (i < nv && i * V >= src.gelu_from) gelu_in_place(a[j], kFast);
    }
  }
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * THREADS;
    if (i < nv) {
      float x[V];
      scaled_floats(a[j], cs, i, x);
      amax = abs_max(x, amax);
    }
  }
  const float r = row_reciprocal<THREADS>(amax, scales, row);
  uint8_t* cr = codes + row * k;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * THREADS;
    if (i < nv) {
      float x[V];
      scaled_floats(a[j], cs, i, x);
      *reinterpret_cast<VecT<uint8_t, V>*>(cr + i * V) = codes_of(x, r);
    }
  }
}

// Longer rows, or rows not aligned to 16 bytes (V = 1): the row's largest magnitude in a first
// pass, the codes in a second (the row then in L2).
template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads) quantise_rows_kernel(Sources<T, V> src, int64_t k, ColScales cs,
                                                                    uint8_t* __restrict__ codes,
                                                                    float* __restrict__ scales) {
  const int64_t row = blockIdx.x, nv = k / V;
  float amax = 0.f;
  for (int64_t i = threadIdx.x; i < nv; i += kRowThreads) {
    float x[V];
    scaled_floats(src.load(row, i), cs, i, x);
    amax = abs_max(x, amax);
  }
  const float r = row_reciprocal<kRowThreads>(amax, scales, row);
  uint8_t* cr = codes + row * k;
  for (int64_t i = threadIdx.x; i < nv; i += kRowThreads) {
    float x[V];
    scaled_floats(src.load(row, i), cs, i, x);
    *reinterpret_cast<VecT<uint8_t, V>*>(cr + i * V) = codes_of(x, r);
  }
}

bool aligned16(const at::Tensor& x, int64_t v) {
  return x.size(1) % v == 0 && x.stride(0) % v == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
}

// x1 undefined: x0 alone. gelu: the last block (x1, else x0) enters as its GELU. aux defined
// (x0 alone): x0 enters as GELU's backward at aux.
template <typename T>
void launch_quantise_rows(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& col_scale,
                          const at::Tensor& codes, const at::Tensor& scales, bool gelu, const at::Tensor& aux) {
  const int64_t m = x0.size(0), k0 = x0.size(1), k = codes.size(1);
  const int64_t gelu_from = !gelu ? k : x1.defined() ? k0 : 0;
  constexpr int V16 = 16 / sizeof(T);
  const bool vec = aligned16(x0, V16) && (!x1.defined() || aligned16(x1, V16)) && (!aux.defined() || aligned16(aux, V16)) &&
                   (!col_scale.defined() || reinterpret_cast<uintptr_t>(col_scale.data_ptr()) % 16 == 0);
  const bool fast = fp8_fast_gelu();
  const T* pa = aux.defined() ? reinterpret_cast<const T*>(aux.data_ptr()) : nullptr;
  const int64_t lda = aux.defined() ? aux.stride(0) : 0;
  const ColScales cs{col_scale.defined() ? col_scale.data_ptr<float>() : nullptr,
                     col_scale.defined() ? static_cast<int>(col_scale.numel()) : 0};
  const T* p0 = reinterpret_cast<const T*>(x0.data_ptr());
  const T* p1 = x1.defined() ? reinterpret_cast<const T*>(x1.data_ptr()) : p0;
  const int64_t ld1 = x1.defined() ? x1.stride(0) : 0;
  auto* cp = reinterpret_cast<uint8_t*>(codes.data_ptr());
  auto* sp = scales.data_ptr<float>();
  auto stream = at::cuda::getCurrentCUDAStream();
  if (!vec) {
    quantise_rows_kernel<T, 1>
        <<<m, kRowThreads, 0, stream>>>(Sources<T, 1>{p0, p1, x0.stride(0), ld1, k0, gelu_from, pa, lda, fast}, k, cs,
                                        cp, sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const Sources<T, V16> src{p0, p1, x0.stride(0), ld1, k0, gelu_from, pa, lda, fast};
  const int64_t per_thread = (k / V16 + kRegThreads - 1) / kRegThreads;
#define FLUXTRAIN_QROWS(NV) \
  quantise_rows_regs_kernel<T, V16, NV, Entry::Plain, kRegThreads><<<m, kRegThreads, 0, stream>>>(src, k, cs, cp, sp)
#define FLUXTRAIN_QROWS_E(E, NV) \
  quantise_rows_regs_kernel<T, V16, NV, E, kGeluThreads><<<m, kGeluThreads, 0, stream>>>(src, k, cs, cp, sp)
#define FLUXTRAIN_QROWS_GELU(NV) \
  fast ? FLUXTRAIN_QROWS_E(Entry::GeluFast, NV) : FLUXTRAIN_QROWS_E(Entry::Gelu, NV)
#define FLUXTRAIN_QROWS_GELU_GRAD(NV) \
  fast ? FLUXTRAIN_QROWS_E(Entry::GeluGradFast, NV) : FLUXTRAIN_QROWS_E(Entry::GeluGrad, NV)
  const int64_t per_gelu_thread = (k / V16 + kGeluThreads - 1) / kGeluThreads;
  // GELU's backward: its arithmetic (tanhf and a dozen more operations per element) spread like
  // the GELU's, over kGeluThreads threads per row; two rows of registers (gradient and input).
  if (pa != nullptr && per_gelu_thread <= 4)
    FLUXTRAIN_QROWS_GELU_GRAD(4);
  else if (pa != nullptr && per_gelu_thread <= kMaxGeluVectors)
    FLUXTRAIN_QROWS_GELU_GRAD(kMaxGeluVectors);
  else if (pa != nullptr)
    quantise_rows_kernel<T, V16><<<m, kRowThreads, 0, stream>>>(src, k, cs, cp, sp);
  else if (gelu && per_gelu_thread <= 4)
    FLUXTRAIN_QROWS_GELU(4);
  else if (gelu && per_gelu_thread <= kMaxGeluVectors)
    FLUXTRAIN_QROWS_GELU(kMaxGeluVectors);
  else if (gelu)
    quantise_rows_kernel<T, V16><<<m, kRowThreads, 0, stream>>>(src, k, cs, cp, sp);
  else if (per_thread <= 4)
    FLUXTRAIN_QROWS(4);
  else if (per_thread <= 8)
    FLUXTRAIN_QROWS(8);
  else if (per_thread <= 12)
    FLUXTRAIN_QROWS(12);
  else if (per_thread <= 16)
    FLUXTRAIN_QROWS(16);
  else if (per_thread <= kMaxRegVectors)
    FLUXTRAIN_QROWS(kMaxRegVectors);
  else
    quantise_rows_kernel<T, V16><<<m, kRowThreads, 0, stream>>>(src, k, cs, cp, sp);
#undef FLUXTRAIN_QROWS
#undef FLUXTRAIN_QROWS_GELU
#undef FLUXTRAIN_QROWS_GELU_GRAD
#undef FLUXTRAIN_QROWS_E
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr int kTile = 64;  // bytes per tile side; 256 threads, 4 words of 4 bytes each

// in [rows, cols] with row stride ld -> out [cols, rows] contiguous, bytes; rows, cols and ld
// multiples of 4 and both pointers 4-byte aligned (the caller checks). Edge tiles are
// bounds-checked per word.
__global__ void __launch_bounds__(256) transpose_codes_kernel(const uint8_t* __restrict__ in, int64_t ld,
                                                              uint8_t* __restrict__ out, int64_t rows, int64_t cols) {
  __shared__ uint8_t tile[kTile][kTile + 4];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;  // 16 words across a row, 16 rows per pass
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int r = ty + 16 * p;
    const int64_t gr = r0 + r, gc = c0 + 4 * tx;
    uint32_t w = 0;
    if (gr < rows && gc < cols) w = *reinterpret_cast<const uint32_t*>(in + gr * ld + gc);
    *reinterpret_cast<uint32_t*>(&tile[r][4 * tx]) = w;
  }
  __syncthreads();
  // Output row c0 + c holds input column c; its 64 bytes are input rows r0 .. r0 + 63.
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int c = ty + 16 * p;
    const int64_t orow = c0 + c, ocol = r0 + 4 * tx;
    if (orow >= cols || ocol >= rows) continue;
    const uint32_t w = static_cast<uint32_t>(tile[4 * tx][c]) | static_cast<uint32_t>(tile[4 * tx + 1][c]) << 8 |
                       static_cast<uint32_t>(tile[4 * tx + 2][c]) << 16 |
                       static_cast<uint32_t>(tile[4 * tx + 3][c]) << 24;
    *reinterpret_cast<uint32_t*>(out + orow * rows + ocol) = w;
  }
}

}  // namespace

Fp8Rows fp8_quantise_rows_cuda(const at::Tensor& x0, const at::Tensor& col_scale, const at::Tensor& x1,
                               bool gelu_last, const at::Tensor& gelu_grad_of) {
  const auto unit_cols = [](const at::Tensor& x) {
    return x.is_cuda() && x.dim() == 2 && x.stride(1) == 1 && x.stride(0) >= x.size(1);
  };
  TORCH_CHECK(unit_cols(x0) && (!x1.defined() || (unit_cols(x1) && x1.size(0) == x0.size(0) &&
                                                  x1.scalar_type() == x0.scalar_type())),
              "fp8_quantise_rows_cuda: CUDA matrices of the same rows and dtype with unit column stride expected");
  TORCH_CHECK(!gelu_grad_of.defined() || (!x1.defined() && !gelu_last && unit_cols(gelu_grad_of) &&
                                          gelu_grad_of.sizes() == x0.sizes() &&
                                          gelu_grad_of.scalar_type() == x0.scalar_type()),
              "fp8_quantise_rows_cuda: GELU's input must match its output's gradient (one block)");
  const int64_t m = x0.size(0), k = x0.size(1) + (x1.defined() ? x1.size(1) : 0);
  TORCH_CHECK(!col_scale.defined() || (col_scale.is_cuda() && col_scale.scalar_type() == at::kFloat &&
                                       col_scale.is_contiguous() && (col_scale.numel() == 1 || col_scale.numel() == k)),
              "fp8_quantise_rows_cuda: float32 column scales ([K] or [1]) expected");
  Fp8Rows q{at::empty({m, k}, x0.options().dtype(at::kFloat8_e4m3fn)), at::empty({m, 1}, x0.options().dtype(at::kFloat))};
  if (m == 0) return q;
  if (k == 0) {
    q.scale.fill_(FLT_MIN);
    return q;
  }
  switch (x0.scalar_type()) {
    case at::kBFloat16: launch_quantise_rows<__nv_bfloat16>(x0, x1, col_scale, q.data, q.scale, gelu_last, gelu_grad_of); break;
    case at::kHalf: launch_quantise_rows<__half>(x0, x1, col_scale, q.data, q.scale, gelu_last, gelu_grad_of); break;
    case at::kFloat: launch_quantise_rows<float>(x0, x1, col_scale, q.data, q.scale, gelu_last, gelu_grad_of); break;
    default: TORCH_CHECK(false, "fp8_quantise_rows_cuda: unsupported dtype ", x0.scalar_type());
  }
  return q;
}

at::Tensor fp8_transpose_codes_cuda(const at::Tensor& codes) {
  TORCH_CHECK(codes.is_cuda() && codes.dim() == 2 && codes.scalar_type() == at::kFloat8_e4m3fn,
              "fp8_transpose_codes_cuda: CUDA e4m3 codes [N, K] expected");
  const int64_t rows = codes.size(0), cols = codes.size(1);
  // A column-narrowed view (single blocks' linear2 halves) is read in place through its row stride.
  const at::Tensor in = codes.stride(1) == 1 && codes.stride(0) >= cols ? codes : codes.contiguous();
  const int64_t ld = in.stride(0);
  if (rows % 4 != 0 || cols % 4 != 0 || ld % 4 != 0 || reinterpret_cast<uintptr_t>(in.data_ptr()) % 4 != 0)
    return in.t().contiguous();
  at::Tensor out = at::empty({cols, rows}, codes.options());
  if (rows == 0 || cols == 0) return out;
  const dim3 grid(static_cast<unsigned>((cols + kTile - 1) / kTile), static_cast<unsigned>((rows + kTile - 1) / kTile));
  transpose_codes_kernel<<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint8_t*>(in.data_ptr()), ld, reinterpret_cast<uint8_t*>(out.data_ptr()), rows, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace fluxtrain::kernels
