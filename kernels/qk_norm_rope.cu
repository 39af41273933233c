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
  Segment<T> s[3];
  int n;
};

// The segment of token l: the last one starting at or before it.
template <typename T>
__device__ __forceinline__ int segment_of(const Segments<T>& segs, int64_t l) {
  return (segs.n > 2 && l >= segs.s[2].l0) ? 2 : (segs.n > 1 && l >= segs.s[1].l0) ? 1 : 0;
}

// A gradient piece [B, heads, l1 - l0, D] with contiguous D covering tokens [l0, l1), or null.
template <typename T>
struct Grad {
  const T* p;
  int64_t sB, sH, sL;
  int64_t l0, l1;
};

// The gradient of q, k or v: up to two pieces (kernels/qk_norm_rope.h, GradPieces).
template <typename T>
struct GradPair {
  Grad<T> a, b;
};

// Row (b, h, l) of a piece, or null when the piece does not cover token l.
template <typename T>
__device__ __forceinline__ const T* piece_row(const Grad<T>& g, int64_t b, int64_t h, int64_t l) {
  return (g.p != nullptr && l >= g.l0 && l < g.l1) ? g.p + b * g.sB + h * g.sH + (l - g.l0) * g.sL : nullptr;
}

// Element d of a gradient given by its pieces' rows (either may be null, not both): the sum
// rounded to T when both are there, as autograd's sum of two gradients in T.
template <typename T>
__device__ __forceinline__ float piece_sum(const T* a, const T* b, int64_t d) {
  if (a != nullptr && b != nullptr) return round_to<T>(__fadd_rn(to_f(a[d]), to_f(b[d])));
  return to_f(a != nullptr ? a[d] : b[d]);
}

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
  const Segment<T>& sg = segs.s[segment_of(segs, ix.l)];
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
                                 GradPair<T> gq, GradPair<T> gk, GradPair<T> gv, int64_t B, int64_t L, int64_t heads,
                                 int64_t D, int64_t rows) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const RowIndex ix = row_index(row, heads, L);
  const Segment<T>& sg = segs.s[segment_of(segs, ix.l)];
  if (sg.dqkv == nullptr) return;
  const int64_t li = ix.l - sg.l0;
  T* dst = sg.dqkv + ((ix.b * sg.L + li) * 3 + ix.t) * heads * D + ix.h * D;
  const GradPair<T>& gr = ix.t == 0 ? gq : ix.t == 1 ? gk : gv;
  const T* ga = piece_row(gr.a, ix.b, ix.h, ix.l);
  const T* gb = piece_row(gr.b, ix.b, ix.h, ix.l);
  if (ga == nullptr && gb == nullptr) {
    for (int64_t d = lane; d < D; d += 32) dst[d] = from_f<T>(0.f);
    return;
  }
  if (ix.t == 2) {
    for (int64_t d = lane; d < D; d += 32) dst[d] = from_f<T>(piece_sum(ga, gb, d));
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
    const float g0 = piece_sum(ga, gb, 2 * j), g1 = piece_sum(ga, gb, 2 * j + 1);
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

// ---- Fast path for D == 128 (FLUX): one block per token (the backward: kBwdParts blocks per
// token), half a warp per row of that token, each of the row's 16 lanes holding 8 consecutive
// elements (four rotation pairs) read and written with one 16-byte access (two for float32). A
// token's 3 * heads rows (q, k, v of each head) are neighbours in memory, so a block reads and
// writes contiguous runs; its cos/sin are read once per thread, not once per row, and a row's
// (part, head) comes from two compares instead of integer divisions (session 11's kernels spent
// as many instructions on row indexing as on arithmetic). A warp takes kVecRows (backward:
// kBwdVecRows) pairs of rows and issues all their loads before any arithmetic. The per-element
// arithmetic is the generic kernels' (same roundings); only the order of the float32 row sums
// differs. Every lane takes part in every shuffle (rows past the block's last compute on zeros
// and store nothing). Operands are selected with scalar selects, never by a reference to a
// kernel parameter chosen at run time: that made nvcc copy the parameters to a per-thread stack
// (96 bytes per thread in session 11's backward kernel). Measured at 512/1024/128 on the H200
// (session 12): session 11's kernels 7.6 (forward) and 14.1 ms (backward) per step; 16-byte
// accesses without the stack 8.2 and 11.2; one block per token 6.4 and 13.3, the backward then
// at 1.1 TB/s and 13% occupancy (106 registers; Nsight Compute), hence its split below.
// The generic kernels above stay for other D, more than kVecMaxHeads heads and unaligned
// operands (vec_path_ok).
constexpr int kVecD = 128;
constexpr int kLaneElems = kVec8;              // elements per lane (one Vec8, kernels/cuda_dtype.cuh)
constexpr int kRowLanes = kVecD / kLaneElems;  // 16 lanes per row
constexpr int kVecRows = 4;                    // row pairs per warp
constexpr int kVecMaxThreads = 384;            // 12 warps: 96 rows, 32 heads
constexpr int kVecMaxHeads = kVecMaxThreads / 32 * 2 * kVecRows / 3;

int vec_threads(int64_t heads) {
  const int64_t rows = 3 * heads, per_warp = 2 * kVecRows;
  return static_cast<int>((rows + per_warp - 1) / per_warp) * 32;
}

// The backward splits a token's rows over kBwdParts blocks and gives each warp kBwdVecRows pairs:
// with one block per token and four pairs per warp it needed 106 registers per thread and ran at
// 13-14% occupancy and 1.1 TB/s (Nsight Compute, session 12).
constexpr int kBwdParts = 2;
constexpr int kBwdVecRows = 2;
int64_t bwd_block_rows(int64_t heads) { return (3 * heads + kBwdParts - 1) / kBwdParts; }
int vec_bwd_threads(int64_t heads) {
  const int64_t per_warp = 2 * kBwdVecRows;
  return static_cast<int>((bwd_block_rows(heads) + per_warp - 1) / per_warp) * 32;
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

// What a thread needs of its block's token: the token's q/k/v input rows (lane offset included),
// its gradient output rows (backward; null when not wanted), the norm scales (read per row, from
// L1: holding them in registers cost the backward kernel half its occupancy) and the lane's
// cos/sin, read once.
template <typename T>
struct VecToken {
  uint32_t b, l;
  const T* src;  // row r at src + r * D
  T* dqkv;       // row r at dqkv + r * D
  const void* qs;
  const void* ks;
  bool qs_f32, ks_f32;
  float cv[kLaneElems / 2], sv[kLaneElems / 2];
};

template <typename T>
__device__ __forceinline__ VecToken<T> vec_token(const Segments<T>& segs, const float* cos_t, const float* sin_t,
                                                 uint32_t tok, uint32_t L, uint32_t heads, int lane16) {
  VecToken<T> k;
  k.b = tok / L;
  k.l = tok - k.b * L;
  const int i = segment_of(segs, k.l);
  // Scalar selects of each field (see above: no reference to a run-time chosen parameter).
  auto pick = [i](auto s0, auto s1, auto s2) { return i == 2 ? s2 : i == 1 ? s1 : s0; };
#define FLUXTRAIN_SEG(f) pick(segs.s[0].f, segs.s[1].f, segs.s[2].f)
  const T* qkv = FLUXTRAIN_SEG(qkv);
  T* dq = FLUXTRAIN_SEG(dqkv);
  const int64_t sB = FLUXTRAIN_SEG(sB);
  const int64_t sL = FLUXTRAIN_SEG(sL);
  const int64_t Ls = FLUXTRAIN_SEG(L);
  const int64_t li = k.l - FLUXTRAIN_SEG(l0);
  k.qs = FLUXTRAIN_SEG(q_scale.p);
  k.ks = FLUXTRAIN_SEG(k_scale.p);
  k.qs_f32 = FLUXTRAIN_SEG(q_scale.f32);
  k.ks_f32 = FLUXTRAIN_SEG(k_scale.f32);
#undef FLUXTRAIN_SEG
  const int64_t lane_off = kLaneElems * lane16;
  k.src = qkv + k.b * sB + li * sL + lane_off;
  k.dqkv = dq == nullptr ? nullptr : dq + (k.b * Ls + li) * 3 * heads * kVecD + lane_off;
  const float4 cs = *reinterpret_cast<const float4*>(cos_t + k.l * (kVecD / 2) + (kLaneElems / 2) * lane16);
  const float4 sn = *reinterpret_cast<const float4*>(sin_t + k.l * (kVecD / 2) + (kLaneElems / 2) * lane16);
  k.cv[0] = cs.x, k.cv[1] = cs.y, k.cv[2] = cs.z, k.cv[3] = cs.w;
  k.sv[0] = sn.x, k.sv[1] = sn.y, k.sv[2] = sn.z, k.sv[3] = sn.w;
  return k;
}

// Part t (0 q, 1 k, 2 v) of the token's row r.
__device__ __forceinline__ uint32_t row_part(uint32_t r, uint32_t heads) { return r >= 2 * heads ? 2 : r >= heads ? 1 : 0; }

// The lane's inputs in float32 and the row's 1/rms (the generic row_rrms' formula).
template <typename T>
__device__ __forceinline__ float vec_rrms(const Vec8<T>& x, float a[kLaneElems]) {
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < kLaneElems; ++e) {
    a[e] = to_f(x.v[e]);
    ss = __fadd_rn(ss, __fmul_rn(a[e], a[e]));
  }
  ss = half_warp_sum(ss);
  return 1.f / sqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(kVecD)), kEps));
}

// grid.x = B * L tokens, vec_threads(heads) threads.
template <typename T>
__global__ void __launch_bounds__(kVecMaxThreads)
    qk_norm_rope_forward_vec_kernel(Segments<T> segs, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                    T* __restrict__ q, T* __restrict__ k, T* __restrict__ v, uint32_t L,
                                    uint32_t heads) {
  const int lane16 = threadIdx.x & (kRowLanes - 1);
  const uint32_t rows = 3 * heads;
  const uint32_t r0 = (threadIdx.x >> 5) * (2 * kVecRows) + ((threadIdx.x & 31) >> 4);
  const VecToken<T> tk = vec_token(segs, cos_t, sin_t, blockIdx.x, L, heads, lane16);
  Vec8<T> x[kVecRows];
#pragma unroll
  for (int i = 0; i < kVecRows; ++i) {
    const uint32_t r = r0 + 2 * i;
    x[i] = r < rows ? load8(tk.src + r * kVecD) : zero8<T>();
  }
  const int64_t tok_out = (static_cast<int64_t>(tk.b) * L + tk.l) * heads * kVecD + kLaneElems * lane16;
#pragma unroll
  for (int i = 0; i < kVecRows; ++i) {
    const uint32_t r = r0 + 2 * i;
    const uint32_t t = row_part(r, heads);
    float a[kLaneElems];
    const float rr = vec_rrms(x[i], a);
    if (r >= rows) continue;
    T* dst = (t == 0 ? q : t == 1 ? k : v) + tok_out + (r - t * heads) * kVecD;
    if (t == 2) {
      store8(dst, x[i]);
      continue;
    }
    float sc[kLaneElems];
    load_scale8<T>(t == 0 ? tk.qs : tk.ks, t == 0 ? tk.qs_f32 : tk.ks_f32, kLaneElems * lane16, sc);
    Vec8<T> o;
#pragma unroll
    for (int p = 0; p < kLaneElems / 2; ++p) {
      const float y0 = round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(a[2 * p], rr)), sc[2 * p]));
      const float y1 = round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(a[2 * p + 1], rr)), sc[2 * p + 1]));
      o.v[2 * p] = from_f<T>(__fsub_rn(__fmul_rn(tk.cv[p], y0), __fmul_rn(tk.sv[p], y1)));
      o.v[2 * p + 1] = from_f<T>(__fadd_rn(__fmul_rn(tk.sv[p], y0), __fmul_rn(tk.cv[p], y1)));
    }
    store8(dst, o);
  }
}

// grid.x = B * L * kBwdParts (part p of token t at t * kBwdParts + p), vec_bwd_threads(heads) threads.
template <typename T>
__global__ void __launch_bounds__(kVecMaxThreads)
    qk_norm_rope_backward_vec_kernel(Segments<T> segs, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, GradPair<T> gq, GradPair<T> gk, GradPair<T> gv,
                                     uint32_t L, uint32_t heads) {
  const int lane16 = threadIdx.x & (kRowLanes - 1);
  const uint32_t rows = 3 * heads, block_rows = (rows + kBwdParts - 1) / kBwdParts;
  const uint32_t part = blockIdx.x % kBwdParts;
  const uint32_t first = part * block_rows, end = min(rows, first + block_rows);
  const uint32_t r0 = first + (threadIdx.x >> 5) * (2 * kBwdVecRows) + ((threadIdx.x & 31) >> 4);
  const VecToken<T> tk = vec_token(segs, cos_t, sin_t, blockIdx.x / kBwdParts, L, heads, lane16);
  if (tk.dqkv == nullptr) return;  // uniform over the block: this segment's gradient is not wanted
  // The gradient pieces' rows of this token (head 0; null where a piece does not cover it), and
  // their head strides.
  const int64_t lane_off = kLaneElems * lane16;
  auto row0 = [&](const Grad<T>& g) {
    const T* p = piece_row(g, tk.b, 0, tk.l);
    return p == nullptr ? p : p + lane_off;
  };
  const T *qa = row0(gq.a), *qb = row0(gq.b), *ka = row0(gk.a), *kb = row0(gk.b), *va = row0(gv.a), *vb = row0(gv.b);
  Vec8<T> gvec[kBwdVecRows], x[kBwdVecRows];
#pragma unroll
  for (int i = 0; i < kBwdVecRows; ++i) {
    const uint32_t r = r0 + 2 * i;
    const uint32_t t = row_part(r, heads), h = r - t * heads;
    const T* ga = t == 0 ? qa : t == 1 ? ka : va;
    const T* gb = t == 0 ? qb : t == 1 ? kb : vb;
    const int64_t sHa = t == 0 ? gq.a.sH : t == 1 ? gk.a.sH : gv.a.sH;
    const int64_t sHb = t == 0 ? gq.b.sH : t == 1 ? gk.b.sH : gv.b.sH;
    const bool has_a = r < end && ga != nullptr, has_b = r < end && gb != nullptr;
    gvec[i] = has_a ? load8(ga + h * sHa) : zero8<T>();
    if (has_b) {  // a second piece: the sum, rounded to T (as autograd's sum of the two)
      const Vec8<T> vb8 = load8(gb + h * sHb);
#pragma unroll
      for (int e = 0; e < kLaneElems; ++e)
        gvec[i].v[e] = has_a ? from_f<T>(__fadd_rn(to_f(gvec[i].v[e]), to_f(vb8.v[e]))) : vb8.v[e];
    }
    x[i] = (has_a || has_b) && t != 2 ? load8(tk.src + r * kVecD) : zero8<T>();
  }
#pragma unroll
  for (int i = 0; i < kBwdVecRows; ++i) {
    const uint32_t r = r0 + 2 * i;
    const uint32_t t = row_part(r, heads);
    float a[kLaneElems];
    const float rr = vec_rrms(x[i], a);
    float sc[kLaneElems];
    if (t != 2) {
      load_scale8<T>(t == 0 ? tk.qs : tk.ks, t == 0 ? tk.qs_f32 : tk.ks_f32, kLaneElems * lane16, sc);
    } else {
#pragma unroll
      for (int e = 0; e < kLaneElems; ++e) sc[e] = 0.f;
    }
    // dy: the gradient rotated back, rounded to T (as in the generic kernel).
    float dy[kLaneElems];
#pragma unroll
    for (int p = 0; p < kLaneElems / 2; ++p) {
      const float ga = to_f(gvec[i].v[2 * p]), gb = to_f(gvec[i].v[2 * p + 1]);
      dy[2 * p] = round_to<T>(__fadd_rn(__fmul_rn(tk.cv[p], ga), __fmul_rn(tk.sv[p], gb)));
      dy[2 * p + 1] = round_to<T>(__fsub_rn(__fmul_rn(tk.cv[p], gb), __fmul_rn(tk.sv[p], ga)));
    }
    float sgx = 0.f;
#pragma unroll
    for (int e = 0; e < kLaneElems; ++e) sgx += (dy[e] * sc[e]) * (a[e] * rr);
    const float m = half_warp_sum(sgx) / static_cast<float>(kVecD);
    if (r >= end) continue;
    T* dst = tk.dqkv + r * kVecD;
    if (t == 2) {  // v: the gradient as it is (zeros when it is undefined)
      store8(dst, gvec[i]);
      continue;
    }
    Vec8<T> o;
#pragma unroll
    for (int e = 0; e < kLaneElems; ++e) o.v[e] = from_f<T>(rr * (dy[e] * sc[e] - (a[e] * rr) * m));
    store8(dst, o);
  }
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether the D == 128 vector kernels may run: at most kVecMaxHeads heads, every row start aligned
// to 8 elements (their
// 16- or 32-byte accesses), scales to 8 elements, cos/sin to 16 bytes, and the row count within
// 32-bit indexing.
bool vec_path_ok(const std::vector<QkvSegment>& segs, const std::vector<at::Tensor>& qs,
                 const std::vector<at::Tensor>& ks, const at::Tensor& cos, const at::Tensor& sin,
                 const std::vector<const at::Tensor*>& grads, int64_t D, int64_t rows, int64_t L, int64_t heads) {
  if (D != kVecD || heads > kVecMaxHeads || rows >= (int64_t{1} << 31) || L * heads * D >= (int64_t{1} << 31))
    return false;
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
Grad<T> make_grad(const at::Tensor& g, int64_t first) {
  if (!g.defined()) return {nullptr, 0, 0, 0, 0, 0};
  return {reinterpret_cast<const T*>(g.data_ptr()), g.stride(0), g.stride(1), g.stride(2), first, first + g.size(2)};
}

template <typename T>
GradPair<T> make_pair(const GradPieces& g) {
  return {make_grad<T>(g.a, g.a_first), make_grad<T>(g.b, g.b_first)};
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
  const int64_t vec_blocks = B * L;  // one block per token
#define FLUXTRAIN_QKNR_FWD(T)                                                                                      \
  if (vec)                                                                                                         \
    qk_norm_rope_forward_vec_kernel<T><<<static_cast<unsigned>(vec_blocks), vec_threads(heads), 0, stream>>>(         \
        make_segments<T>(segs, qs, ks, nullptr), c.data_ptr<float>(), s.data_ptr<float>(),                          \
        reinterpret_cast<T*>(q.data_ptr()), reinterpret_cast<T*>(k.data_ptr()), reinterpret_cast<T*>(v.data_ptr()), \
        static_cast<uint32_t>(L), static_cast<uint32_t>(heads));                                                   \
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

std::vector<at::Tensor> qk_norm_rope_backward_cuda(const GradPieces& dq_in, const GradPieces& dk_in,
                                                   const GradPieces& dv_in, const std::vector<QkvSegment>& segs,
                                                   int64_t heads, const at::Tensor& cos, const at::Tensor& sin,
                                                   const std::vector<bool>& need_dqkv) {
  TORCH_CHECK(qk_norm_rope_cuda_supported(segs, heads, cos, sin) && need_dqkv.size() == segs.size(),
              "qk_norm_rope_backward_cuda: unsupported arguments");
  const at::Tensor& q0 = segs[0].qkv;
  const int64_t B = q0.size(0), D = q0.size(2) / (3 * heads), L = total_tokens(segs);
  // Gradient pieces in the dtype with a contiguous last dim (other strides are free).
  auto prep_piece = [&](const at::Tensor& g, int64_t first) {
    if (!g.defined()) return g;
    TORCH_CHECK(g.dim() == 4 && g.size(0) == B && g.size(1) == heads && first >= 0 && first + g.size(2) <= L &&
                    g.size(3) == D,
                "qk_norm_rope_backward_cuda: gradient pieces must be [B, heads, L_p, D] within the ", L, " tokens");
    at::Tensor t = g.to(q0.scalar_type());
    return t.stride(3) == 1 ? t : t.contiguous();
  };
  auto prep = [&](const GradPieces& g) {
    return GradPieces(prep_piece(g.a, g.a_first), g.a_first, prep_piece(g.b, g.b_first), g.b_first);
  };
  const GradPieces dq = prep(dq_in), dk = prep(dk_in), dv = prep(dv_in);
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
  const bool vec = vec_path_ok(segs, qs, ks, c, s, {&dq.a, &dq.b, &dk.a, &dk.b, &dv.a, &dv.b}, D, rows, L, heads);
  const int64_t vec_blocks = B * L * kBwdParts;  // kBwdParts blocks per token

#define FLUXTRAIN_QKNR_BWD(T)                                                                                   \
  if (vec)                                                                                                      \
    qk_norm_rope_backward_vec_kernel<T><<<static_cast<unsigned>(vec_blocks), vec_bwd_threads(heads), 0, stream>>>( \
        make_segments<T>(segs, qs, ks, &dqkv), c.data_ptr<float>(), s.data_ptr<float>(), make_pair<T>(dq),      \
        make_pair<T>(dk), make_pair<T>(dv), static_cast<uint32_t>(L), static_cast<uint32_t>(heads));          \
  else                                                                                                          \
  qk_norm_rope_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(                       \
      make_segments<T>(segs, qs, ks, &dqkv), c.data_ptr<float>(), s.data_ptr<float>(), make_pair<T>(dq),         \
      make_pair<T>(dk), make_pair<T>(dv), B, L, heads, D, rows)
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
