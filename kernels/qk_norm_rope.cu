// Fused head split + QK RMSNorm + RoPE (kernels/qk_norm_rope.h). One warp per row, a row being
// the D values of one (batch b, token l, part t in {q, k, v}, head h); rows are numbered in the
// qkv memory order (b, l, t, h) so that neighbouring warps read neighbouring memory. For q and
// k: sum of squares over D (lanes stride through D, then a warp shuffle sum), r = 1/sqrt(mean +
// eps), then each lane takes pairs j = lane, lane + 32, ...: normalise, round, scale, round,
// rotate, round, store. v rows are copied. The row is read twice (the second time from L1/L2).
// Every float32 operation that the reference does as a separate ATen op is written with an
// explicit _rn intrinsic so that nvcc cannot contract it into an FMA (which would round
// differently from the reference).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda_dtype.cuh"
#include "kernels/qk_norm_rope.h"

namespace fluxtrain::kernels {
namespace {

constexpr int kThreads = 256;  // 8 warps = 8 rows per block
constexpr int kWarps = kThreads / 32;
constexpr float kEps = 1e-6f;


__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A norm scale [D], read in its own dtype (T, or float32): no float32 copy per call.
template <typename T>
struct ScaleRef {
  const void* p;
  bool f32;
  __device__ __forceinline__ float operator[](int64_t i) const {
    return f32 ? static_cast<const float*>(p)[i] : to_f(static_cast<const T*>(p)[i]);
  }
};

template <typename T>
struct Segment {
  const T* qkv;          // [B, L, 3, heads, D] with batch stride sB and token stride sL (elements)
  T* dqkv;               // backward: contiguous [B, L, 3*heads*D], null when not needed
  ScaleRef<T> q_scale;  // [D]
  ScaleRef<T> k_scale;
  int64_t L, sB, sL;
  int64_t l0;  // first token of this segment in the concatenation
};

template <typename T>
struct Segments {
  Segment<T> s[2];
  int n;
};

// A grad tensor [B, heads, L, D] with contiguous D, or null (zero).
template <typename T>
struct Grad {
  const T* p;
  int64_t sB, sH, sL;
};

struct RowIndex {
  int64_t b, l, t, h;
};

__device__ __forceinline__ RowIndex row_index(int64_t row, int64_t heads, int64_t L) {
  RowIndex r;
  r.h = row % heads;
  r.t = (row / heads) % 3;
  const int64_t bl = row / (3 * heads);
  r.l = bl % L;
  r.b = bl / L;
  return r;
}

// 1/rms of a row (every lane gets it): reference = rsqrt(mean(x^2) + eps) in float32.
template <typename T>
__device__ __forceinline__ float row_rrms(const T* src, int64_t D, int lane) {
  float ss = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    const float a = to_f(src[d]);
    ss = __fadd_rn(ss, __fmul_rn(a, a));
  }
  ss = warp_sum(ss);
  return 1.f / sqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(D)), kEps));
}

// Forward. q, k, v: contiguous [B, heads, L, D]; cos, sin: contiguous [L, D/2] float32.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    qk_norm_rope_forward_kernel(Segments<T> segs, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                T* __restrict__ q, T* __restrict__ k, T* __restrict__ v, int64_t B, int64_t L,
                                int64_t heads, int64_t D, int64_t rows) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // uniform over the warp
  const RowIndex ix = row_index(row, heads, L);
  const Segment<T>& sg = (segs.n > 1 && ix.l >= segs.s[1].l0) ? segs.s[1] : segs.s[0];
  const T* src = sg.qkv + ix.b * sg.sB + (ix.l - sg.l0) * sg.sL + (ix.t * heads + ix.h) * D;
  const int64_t out_off = ((ix.b * L + ix.l) * heads + ix.h) * D;  // [B, L, heads, D] memory
  if (ix.t == 2) {
    T* dst = v + out_off;
    for (int64_t d = lane; d < D; d += 32) dst[d] = src[d];
    return;
  }
  T* dst = (ix.t == 0 ? q : k) + out_off;
  const ScaleRef<T> scale = ix.t == 0 ? sg.q_scale : sg.k_scale;
  const float r = row_rrms(src, D, lane);
  const int64_t D2 = D / 2;
  const float* cr = cos_t + ix.l * D2;
  const float* sr = sin_t + ix.l * D2;
  for (int64_t j = lane; j < D2; j += 32) {
    // rms_norm: (x * r) rounded, times the scale, rounded.
    const float y0 = round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(to_f(src[2 * j]), r)), scale[2 * j]));
    const float y1 = round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(to_f(src[2 * j + 1]), r)), scale[2 * j + 1]));
    // rope: (c*y0 - s*y1, s*y0 + c*y1), each product rounded to float32, then the sum.
    const float c = cr[j], s = sr[j];
    dst[2 * j] = from_f<T>(__fsub_rn(__fmul_rn(c, y0), __fmul_rn(s, y1)));
    dst[2 * j + 1] = from_f<T>(__fadd_rn(__fmul_rn(s, y0), __fmul_rn(c, y1)));
  }
}

// Backward: dqkv of each segment that wants it (contiguous [B, L_i, 3, heads, D]).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    qk_norm_rope_backward_kernel(Segments<T> segs, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                 Grad<T> gq, Grad<T> gk, Grad<T> gv, int64_t B, int64_t L, int64_t heads, int64_t D,
                                 int64_t rows) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const RowIndex ix = row_index(row, heads, L);
  const Segment<T>& sg = (segs.n > 1 && ix.l >= segs.s[1].l0) ? segs.s[1] : segs.s[0];
  if (sg.dqkv == nullptr) return;
  const int64_t li = ix.l - sg.l0;
  T* dst = sg.dqkv + ((ix.b * sg.L + li) * 3 + ix.t) * heads * D + ix.h * D;
  const Grad<T>& gr = ix.t == 0 ? gq : ix.t == 1 ? gk : gv;
  if (gr.p == nullptr) {
    for (int64_t d = lane; d < D; d += 32) dst[d] = from_f<T>(0.f);
    return;
  }
  const T* g = gr.p + ix.b * gr.sB + ix.h * gr.sH + ix.l * gr.sL;
  if (ix.t == 2) {
    for (int64_t d = lane; d < D; d += 32) dst[d] = g[d];
    return;
  }
  const T* src = sg.qkv + ix.b * sg.sB + li * sg.sL + (ix.t * heads + ix.h) * D;
  const ScaleRef<T> scale = ix.t == 0 ? sg.q_scale : sg.k_scale;
  const float r = row_rrms(src, D, lane);
  const int64_t D2 = D / 2;
  const float* cr = cos_t + ix.l * D2;
  const float* sr = sin_t + ix.l * D2;
  // dy of pair j: the gradient rotated back (c*g0 + s*g1, c*g1 - s*g0), rounded to T as the
  // unfused RopeFunction's backward output is.
  auto dy_pair = [&](int64_t j, float& dy0, float& dy1) {
    const float g0 = to_f(g[2 * j]), g1 = to_f(g[2 * j + 1]);
    const float c = cr[j], s = sr[j];
    dy0 = round_to<T>(__fadd_rn(__fmul_rn(c, g0), __fmul_rn(s, g1)));
    dy1 = round_to<T>(__fsub_rn(__fmul_rn(c, g1), __fmul_rn(s, g0)));
  };
  float sgx = 0.f;  // sum over D of (dy * scale) * xhat
  for (int64_t j = lane; j < D2; j += 32) {
    float dy0, dy1;
    dy_pair(j, dy0, dy1);
    sgx += (dy0 * scale[2 * j]) * (to_f(src[2 * j]) * r) + (dy1 * scale[2 * j + 1]) * (to_f(src[2 * j + 1]) * r);
  }
  const float m = warp_sum(sgx) / static_cast<float>(D);
  for (int64_t j = lane; j < D2; j += 32) {
    float dy0, dy1;
    dy_pair(j, dy0, dy1);
    const float xh0 = to_f(src[2 * j]) * r, xh1 = to_f(src[2 * j + 1]) * r;
    dst[2 * j] = from_f<T>(r * (dy0 * scale[2 * j] - xh0 * m));
    dst[2 * j + 1] = from_f<T>(r * (dy1 * scale[2 * j + 1] - xh1 * m));
  }
}

// ---- Fast path for D == 128 (FLUX): half a warp per row, each of its 16 lanes holding 8
// consecutive elements (four rotation pairs) read and written with one 16-byte access (two for
// float32), and 32-bit row indexing. A warp takes kVecRows pairs of neighbouring rows and issues
// all their loads before any arithmetic. The per-element arithmetic is the generic kernels'
// (same roundings); only the order of the float32 row sums differs. Every lane takes part in
// every shuffle (rows past the end and rows without a gradient compute on zeros and store
// nothing), so the two half-warps may take different branches only around loads and stores.
// Operands are selected with scalar selects, never by reference to a kernel parameter: a
// reference chosen at run time made nvcc copy the parameters to a per-thread stack (96 bytes per
// thread in session 11's backward kernel, which ran at about 1.1 TB/s).
// The generic kernels above stay for other D and for unaligned operands (vec_path_ok).
constexpr int kVecD = 128;
constexpr int kLaneElems = 8;                     // elements per lane
constexpr int kRowLanes = kVecD / kLaneElems;     // 16 lanes per row
constexpr int kVecRows = 4;                       // row pairs per warp

template <typename T>
struct alignas(kLaneElems * sizeof(T)) Vec8 {
  T v[kLaneElems];
};

template <typename T>
__device__ __forceinline__ Vec8<T> load8(const T* p) { return *reinterpret_cast<const Vec8<T>*>(p); }
template <typename T>
__device__ __forceinline__ void store8(T* p, const Vec8<T>& x) { *reinterpret_cast<Vec8<T>*>(p) = x; }
template <typename T>
__device__ __forceinline__ Vec8<T> zero8() {
  Vec8<T> z;
#pragma unroll
  for (int e = 0; e < kLaneElems; ++e) z.v[e] = from_f<T>(0.f);
  return z;
}

// Sum over the 16 lanes of a half-warp (every lane of the warp calls it).
__device__ __forceinline__ float half_warp_sum(float v) {
  for (int o = kRowLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Elements i..i+7 of a scale (T or float32), aligned to 8 elements.
template <typename T>
__device__ __forceinline__ void load_scale8(const void* p, bool f32, uint32_t i, float out[kLaneElems]) {
  if (f32) {
    const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    const float4 b = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i + 4);
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  } else {
    const Vec8<T> v = load8(static_cast<const T*>(p) + i);
#pragma unroll
    for (int e = 0; e < kLaneElems; ++e) out[e] = to_f(v.v[e]);
  }
}

struct RowIndex32 {
  uint32_t b, l, t, h;
};

__device__ __forceinline__ RowIndex32 row_index32(uint32_t row, uint32_t heads, uint32_t L) {
  RowIndex32 r;
  const uint32_t th = row / heads;
  r.h = row - th * heads;
  const uint32_t bl = th / 3;
  r.t = th - bl * 3;
  r.b = bl / L;
  r.l = bl - r.b * L;
  return r;
}

// The operands of one row, selected by scalar selects from the kernel's parameters.
template <typename T>
struct VecRowArgs {
  const T* src;        // the row's q/k/v input (its lane's elements)
  const void* scale;   // the norm scale of q or k
  bool scale_f32;
  T* dqkv;             // backward: the row's gradient output (its lane's elements), null when not wanted
  uint32_t li;         // token index within the row's segment
};

template <typename T>
__device__ __forceinline__ VecRowArgs<T> vec_row_args(const Segments<T>& segs, const RowIndex32& ix, uint32_t heads,
                                                      int lane16) {
  const bool second = segs.n > 1 && ix.l >= segs.s[1].l0;
  const T* qkv = second ? segs.s[1].qkv : segs.s[0].qkv;
  const int64_t sB = second ? segs.s[1].sB : segs.s[0].sB;
  const int64_t sL = second ? segs.s[1].sL : segs.s[0].sL;
  const int64_t l0 = second ? segs.s[1].l0 : segs.s[0].l0;
  const int64_t Ls = second ? segs.s[1].L : segs.s[0].L;
  const void* qsp = second ? segs.s[1].q_scale.p : segs.s[0].q_scale.p;
  const void* ksp = second ? segs.s[1].k_scale.p : segs.s[0].k_scale.p;
  const bool qsf = second ? segs.s[1].q_scale.f32 : segs.s[0].q_scale.f32;
  const bool ksf = second ? segs.s[1].k_scale.f32 : segs.s[0].k_scale.f32;
  T* dq = second ? segs.s[1].dqkv : segs.s[0].dqkv;
  VecRowArgs<T> a;
  a.li = ix.l - static_cast<uint32_t>(l0);
  const int64_t e = (ix.t * heads + ix.h) * kVecD + kLaneElems * lane16;
  a.src = qkv + ix.b * sB + a.li * sL + e;
  a.scale = ix.t == 0 ? qsp : ksp;
  a.scale_f32 = ix.t == 0 ? qsf : ksf;
  a.dqkv = dq == nullptr ? nullptr : dq + ((ix.b * Ls + a.li) * 3) * heads * kVecD + e;
  return a;
}

// What both kernels compute for a q or k row before they differ: the lane's inputs in float32,
// the row's 1/rms (the generic row_rrms' formula), the lane's scales and its pairs' cos/sin.
struct VecRow {
  float a[kLaneElems], r, scv[kLaneElems], cv[kLaneElems / 2], sv[kLaneElems / 2];
};

template <typename T>
__device__ __forceinline__ VecRow vec_row(const Vec8<T>& x, const VecRowArgs<T>& args, bool is_qk,
                                          const float* cos_t, const float* sin_t, uint32_t l, int lane16) {
  constexpr int D = kVecD;
  VecRow w;
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < kLaneElems; ++e) {
    w.a[e] = to_f(x.v[e]);
    ss = __fadd_rn(ss, __fmul_rn(w.a[e], w.a[e]));
  }
  ss = half_warp_sum(ss);
  w.r = 1.f / sqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(D)), kEps));
  if (is_qk) {
    load_scale8<T>(args.scale, args.scale_f32, kLaneElems * lane16, w.scv);
    const float4 cs = *reinterpret_cast<const float4*>(cos_t + l * (D / 2) + (kLaneElems / 2) * lane16);
    const float4 sn = *reinterpret_cast<const float4*>(sin_t + l * (D / 2) + (kLaneElems / 2) * lane16);
    w.cv[0] = cs.x, w.cv[1] = cs.y, w.cv[2] = cs.z, w.cv[3] = cs.w;
    w.sv[0] = sn.x, w.sv[1] = sn.y, w.sv[2] = sn.z, w.sv[3] = sn.w;
  } else {
#pragma unroll
    for (int e = 0; e < kLaneElems; ++e) w.scv[e] = 0.f;
#pragma unroll
    for (int p = 0; p < kLaneElems / 2; ++p) w.cv[p] = 0.f, w.sv[p] = 0.f;
  }
  return w;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    qk_norm_rope_forward_vec_kernel(Segments<T> segs, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                    T* __restrict__ q, T* __restrict__ k, T* __restrict__ v, uint32_t L,
                                    uint32_t heads, uint32_t rows) {
  const int lane16 = threadIdx.x & (kRowLanes - 1);
  const uint32_t half = (threadIdx.x & 31) >> 4;
  const uint32_t row0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * (2 * kVecRows) + half;
  RowIndex32 ix[kVecRows];
  Vec8<T> x[kVecRows];
#pragma unroll
  for (int i = 0; i < kVecRows; ++i) {
    const uint32_t row = row0 + 2 * i;
    ix[i] = row_index32(row < rows ? row : rows - 1, heads, L);
    x[i] = row < rows ? load8(vec_row_args(segs, ix[i], heads, lane16).src) : zero8<T>();
  }
#pragma unroll
  for (int i = 0; i < kVecRows; ++i) {
    const uint32_t row = row0 + 2 * i;
    const bool is_qk = ix[i].t != 2;
    const VecRowArgs<T> args = vec_row_args(segs, ix[i], heads, lane16);
    const VecRow w = vec_row(x[i], args, is_qk && row < rows, cos_t, sin_t, ix[i].l, lane16);
    if (row >= rows) continue;
    const int64_t out_off =
        ((static_cast<int64_t>(ix[i].b) * L + ix[i].l) * heads + ix[i].h) * kVecD + kLaneElems * lane16;
    if (!is_qk) {
      store8(v + out_off, x[i]);
      continue;
    }
    Vec8<T> o;
#pragma unroll
    for (int p = 0; p < kLaneElems / 2; ++p) {
      const float y0 = round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(w.a[2 * p], w.r)), w.scv[2 * p]));
      const float y1 = round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(w.a[2 * p + 1], w.r)), w.scv[2 * p + 1]));
      o.v[2 * p] = from_f<T>(__fsub_rn(__fmul_rn(w.cv[p], y0), __fmul_rn(w.sv[p], y1)));
      o.v[2 * p + 1] = from_f<T>(__fadd_rn(__fmul_rn(w.sv[p], y0), __fmul_rn(w.cv[p], y1)));
    }
    store8((ix[i].t == 0 ? q : k) + out_off, o);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    qk_norm_rope_backward_vec_kernel(Segments<T> segs, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, Grad<T> gq, Grad<T> gk, Grad<T> gv, uint32_t L,
                                     uint32_t heads, uint32_t rows) {
  const int lane16 = threadIdx.x & (kRowLanes - 1);
  const uint32_t half = (threadIdx.x & 31) >> 4;
  const uint32_t row0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * (2 * kVecRows) + half;
  RowIndex32 ix[kVecRows];
  Vec8<T> gvec[kVecRows], x[kVecRows];
  bool has_g[kVecRows];
#pragma unroll
  for (int i = 0; i < kVecRows; ++i) {
    const uint32_t row = row0 + 2 * i;
    ix[i] = row_index32(row < rows ? row : rows - 1, heads, L);
    const uint32_t t = ix[i].t;
    const T* gp = t == 0 ? gq.p : t == 1 ? gk.p : gv.p;
    const int64_t gsB = t == 0 ? gq.sB : t == 1 ? gk.sB : gv.sB;
    const int64_t gsH = t == 0 ? gq.sH : t == 1 ? gk.sH : gv.sH;
    const int64_t gsL = t == 0 ? gq.sL : t == 1 ? gk.sL : gv.sL;
    const VecRowArgs<T> args = vec_row_args(segs, ix[i], heads, lane16);
    has_g[i] = row < rows && gp != nullptr && args.dqkv != nullptr;
    gvec[i] = has_g[i] ? load8(gp + ix[i].b * gsB + ix[i].h * gsH + ix[i].l * gsL + kLaneElems * lane16) : zero8<T>();
    x[i] = has_g[i] && t != 2 ? load8(args.src) : zero8<T>();
  }
#pragma unroll
  for (int i = 0; i < kVecRows; ++i) {
    const uint32_t row = row0 + 2 * i;
    const bool is_qk = ix[i].t != 2;
    const VecRowArgs<T> args = vec_row_args(segs, ix[i], heads, lane16);
    const VecRow w = vec_row(x[i], args, is_qk && has_g[i], cos_t, sin_t, ix[i].l, lane16);
    // dy: the gradient rotated back, rounded to T (as in the generic kernel).
    float dy[kLaneElems];
#pragma unroll
    for (int p = 0; p < kLaneElems / 2; ++p) {
      const float g0 = to_f(gvec[i].v[2 * p]), g1 = to_f(gvec[i].v[2 * p + 1]);
      dy[2 * p] = round_to<T>(__fadd_rn(__fmul_rn(w.cv[p], g0), __fmul_rn(w.sv[p], g1)));
      dy[2 * p + 1] = round_to<T>(__fsub_rn(__fmul_rn(w.cv[p], g1), __fmul_rn(w.sv[p], g0)));
    }
    float sgx = 0.f;
#pragma unroll
    for (int e = 0; e < kLaneElems; ++e) sgx += (dy[e] * w.scv[e]) * (w.a[e] * w.r);
    const float m = half_warp_sum(sgx) / static_cast<float>(kVecD);
    if (row >= rows || args.dqkv == nullptr) continue;
    T* dst = args.dqkv;
    if (!has_g[i]) {
      store8(dst, zero8<T>());
      continue;
    }
    if (!is_qk) {
      store8(dst, gvec[i]);
      continue;
    }
    Vec8<T> o;
#pragma unroll
    for (int e = 0; e < kLaneElems; ++e) o.v[e] = from_f<T>(w.r * (dy[e] * w.scv[e] - (w.a[e] * w.r) * m));
    store8(dst, o);
  }
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether the D == 128 vector kernels may run: every row start aligned to 8 elements (their
// 16- or 32-byte accesses), scales to 8 elements, cos/sin to 16 bytes, and the row count within
// 32-bit indexing.
bool vec_path_ok(const std::vector<QkvSegment>& segs, const std::vector<at::Tensor>& qs,
                 const std::vector<at::Tensor>& ks, const at::Tensor& cos, const at::Tensor& sin,
                 const std::vector<const at::Tensor*>& grads, int64_t D, int64_t rows, int64_t L, int64_t heads) {
  if (D != kVecD || rows >= (int64_t{1} << 31) || L * heads * D >= (int64_t{1} << 31)) return false;
  const size_t e = segs[0].qkv.element_size(), row_bytes = kLaneElems * e;
  for (const auto& s : segs)
    if (!aligned_to(s.qkv.data_ptr(), row_bytes) || s.qkv.stride(0) % kLaneElems != 0 ||
        s.qkv.stride(1) % kLaneElems != 0)
      return false;
  for (const auto* v : {&qs, &ks})
    for (const auto& t : *v)
      if (!aligned_to(t.data_ptr(), kLaneElems * t.element_size())) return false;
  if (!aligned_to(cos.data_ptr(), 16) || !aligned_to(sin.data_ptr(), 16)) return false;
  for (const at::Tensor* g : grads)
    if (g->defined() && (!aligned_to(g->data_ptr(), row_bytes) || g->stride(0) % kLaneElems != 0 ||
                         g->stride(1) % kLaneElems != 0 || g->stride(2) % kLaneElems != 0))
      return false;
  return true;
}

template <typename T>
Segments<T> make_segments(const std::vector<QkvSegment>& segs, const std::vector<at::Tensor>& qs,
                          const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>* dqkv) {
  Segments<T> out{};
  out.n = static_cast<int>(segs.size());
  int64_t l0 = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    const at::Tensor& x = segs[i].qkv;
    Segment<T>& s = out.s[i];
    s.qkv = reinterpret_cast<const T*>(x.data_ptr());
    s.dqkv = (dqkv && (*dqkv)[i].defined()) ? reinterpret_cast<T*>((*dqkv)[i].data_ptr()) : nullptr;
    s.q_scale = {qs[i].data_ptr(), qs[i].scalar_type() == at::kFloat};
    s.k_scale = {ks[i].data_ptr(), ks[i].scalar_type() == at::kFloat};
    s.L = x.size(1);
    s.sB = x.stride(0);
    s.sL = x.stride(1);
    s.l0 = l0;
    l0 += x.size(1);
  }
  return out;
}

template <typename T>
Grad<T> make_grad(const at::Tensor& g) {
  if (!g.defined()) return {nullptr, 0, 0, 0};
  return {reinterpret_cast<const T*>(g.data_ptr()), g.stride(0), g.stride(1), g.stride(2)};
}

// Contiguous views of the scales in their own dtype (the kernels read T or float32), kept alive by
// the caller.
void scale_views(const std::vector<QkvSegment>& segs, std::vector<at::Tensor>& qs, std::vector<at::Tensor>& ks) {
  for (const auto& s : segs) {
    qs.push_back(s.q_scale.contiguous().view({-1}));
    ks.push_back(s.k_scale.contiguous().view({-1}));
  }
}

int64_t total_tokens(const std::vector<QkvSegment>& segs) {
  int64_t L = 0;
  for (const auto& s : segs) L += s.qkv.size(1);
  return L;
}

}  // namespace

std::array<at::Tensor, 3> qk_norm_rope_forward_cuda(const std::vector<QkvSegment>& segs, int64_t heads,
                                                    const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(qk_norm_rope_cuda_supported(segs, heads, cos, sin), "qk_norm_rope_forward_cuda: unsupported arguments");
  const at::Tensor& q0 = segs[0].qkv;
  const int64_t B = q0.size(0), D = q0.size(2) / (3 * heads), L = total_tokens(segs);
  // [B, heads, L, D] views of [B, L, heads, D] memory (kernels/qk_norm_rope.h says why).
  at::Tensor q = at::empty({B, L, heads, D}, q0.options()).transpose(1, 2);
  at::Tensor k = at::empty({B, L, heads, D}, q0.options()).transpose(1, 2);
  at::Tensor v = at::empty({B, L, heads, D}, q0.options()).transpose(1, 2);
  const int64_t rows = B * L * 3 * heads;
  if (rows == 0) return {q, k, v};
  std::vector<at::Tensor> qs, ks;
  scale_views(segs, qs, ks);
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  TORCH_CHECK(blocks <= 0x7fffffff, "qk_norm_rope_forward_cuda: too many rows");
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool vec = vec_path_ok(segs, qs, ks, c, s, {}, D, rows, L, heads);
  const int64_t vec_blocks = (rows + kWarps * 2 * kVecRows - 1) / (kWarps * 2 * kVecRows);
#define FLUXTRAIN_QKNR_FWD(T)                                                                                      \
  if (vec)                                                                                                         \
    qk_norm_rope_forward_vec_kernel<T><<<static_cast<unsigned>(vec_blocks), kThreads, 0, stream>>>(                    \
        make_segments<T>(segs, qs, ks, nullptr), c.data_ptr<float>(), s.data_ptr<float>(),                          \
        reinterpret_cast<T*>(q.data_ptr()), reinterpret_cast<T*>(k.data_ptr()), reinterpret_cast<T*>(v.data_ptr()), \
        static_cast<uint32_t>(L), static_cast<uint32_t>(heads), static_cast<uint32_t>(rows));                      \
  else                                                                                                             \
  qk_norm_rope_forward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(                           \
      make_segments<T>(segs, qs, ks, nullptr), c.data_ptr<float>(), s.data_ptr<float>(),                            \
      reinterpret_cast<T*>(q.data_ptr()), reinterpret_cast<T*>(k.data_ptr()), reinterpret_cast<T*>(v.data_ptr()), B, \
      L, heads, D, rows)
  switch (q0.scalar_type()) {
    case at::kBFloat16: FLUXTRAIN_QKNR_FWD(__nv_bfloat16); break;
    case at::kHalf: FLUXTRAIN_QKNR_FWD(__half); break;
    case at::kFloat: FLUXTRAIN_QKNR_FWD(float); break;
    default: TORCH_CHECK(false, "qk_norm_rope_forward_cuda: unsupported dtype ", q0.scalar_type());
  }
#undef FLUXTRAIN_QKNR_FWD
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, k, v};
}

std::vector<at::Tensor> qk_norm_rope_backward_cuda(const at::Tensor& dq_in, const at::Tensor& dk_in,
                                                   const at::Tensor& dv_in, const std::vector<QkvSegment>& segs,
                                                   int64_t heads, const at::Tensor& cos, const at::Tensor& sin,
                                                   const std::vector<bool>& need_dqkv) {
  TORCH_CHECK(qk_norm_rope_cuda_supported(segs, heads, cos, sin) && need_dqkv.size() == segs.size(),
              "qk_norm_rope_backward_cuda: unsupported arguments");
  const at::Tensor& q0 = segs[0].qkv;
  const int64_t B = q0.size(0), D = q0.size(2) / (3 * heads), L = total_tokens(segs);
  // Gradients in the dtype with a contiguous last dim (other strides are free).
  auto prep = [&](const at::Tensor& g) {
    if (!g.defined()) return g;
    TORCH_CHECK(g.dim() == 4 && g.size(0) == B && g.size(1) == heads && g.size(2) == L && g.size(3) == D,
                "qk_norm_rope_backward_cuda: gradients must be [B, heads, L, D]");
    at::Tensor t = g.to(q0.scalar_type());
    return t.stride(3) == 1 ? t : t.contiguous();
  };
  at::Tensor dq = prep(dq_in), dk = prep(dk_in), dv = prep(dv_in);
  std::vector<at::Tensor> dqkv(segs.size());
  bool any = false;
  for (size_t i = 0; i < segs.size(); ++i) {
    if (!need_dqkv[i]) continue;
    dqkv[i] = at::empty({B, segs[i].qkv.size(1), q0.size(2)}, q0.options());
    any = true;
  }
  const int64_t rows = B * L * 3 * heads;
  if (!any || rows == 0) return dqkv;
  std::vector<at::Tensor> qs, ks;
  scale_views(segs, qs, ks);
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  TORCH_CHECK(blocks <= 0x7fffffff, "qk_norm_rope_backward_cuda: too many rows");
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool vec = vec_path_ok(segs, qs, ks, c, s, {&dq, &dk, &dv}, D, rows, L, heads);
  const int64_t vec_blocks = (rows + kWarps * 2 * kVecRows - 1) / (kWarps * 2 * kVecRows);

#define FLUXTRAIN_QKNR_BWD(T)                                                                                   \
  if (vec)                                                                                                      \
    qk_norm_rope_backward_vec_kernel<T><<<static_cast<unsigned>(vec_blocks), kThreads, 0, stream>>>(                \
        make_segments<T>(segs, qs, ks, &dqkv), c.data_ptr<float>(), s.data_ptr<float>(), make_grad<T>(dq),      \
        make_grad<T>(dk), make_grad<T>(dv), static_cast<uint32_t>(L), static_cast<uint32_t>(heads),            \
        static_cast<uint32_t>(rows));                                                                           \
  else                                                                                                          \
  qk_norm_rope_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(                       \
      make_segments<T>(segs, qs, ks, &dqkv), c.data_ptr<float>(), s.data_ptr<float>(), make_grad<T>(dq),         \
      make_grad<T>(dk), make_grad<T>(dv), B, L, heads, D, rows)
  switch (q0.scalar_type()) {
    case at::kBFloat16: FLUXTRAIN_QKNR_BWD(__nv_bfloat16); break;
    case at::kHalf: FLUXTRAIN_QKNR_BWD(__half); break;
    case at::kFloat: FLUXTRAIN_QKNR_BWD(float); break;
    default: TORCH_CHECK(false, "qk_norm_rope_backward_cuda: unsupported dtype ", q0.scalar_type());
  }
#undef FLUXTRAIN_QKNR_BWD
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dqkv;
}

}  // namespace fluxtrain::kernels
