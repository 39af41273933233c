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

// ---- Fast path for D == 128 (FLUX): one warp per row, each lane holding 4 consecutive elements
// (pairs 2*lane and 2*lane + 1) in registers, read and written with one vector access each, and
// 32-bit row indexing. The per-element arithmetic is the generic kernels' (same roundings); only
// the order of the warp's float32 sums differs. The generic kernels above stay for other D and
// for unaligned operands (vec_path_ok on the host).
constexpr int kVecD = 128;

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ Vec4<T> load4(const T* p) { return *reinterpret_cast<const Vec4<T>*>(p); }
template <typename T>
__device__ __forceinline__ void store4(T* p, const Vec4<T>& x) { *reinterpret_cast<Vec4<T>*>(p) = x; }

// Elements i..i+3 of a scale (16-byte aligned when float32, 4-element aligned otherwise).
template <typename T>
__device__ __forceinline__ void load_scale4(const ScaleRef<T>& sc, int64_t i, float out[4]) {
  if (sc.f32) {
    const float4 v = *reinterpret_cast<const float4*>(static_cast<const float*>(sc.p) + i);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    const Vec4<T> v = load4(static_cast<const T*>(sc.p) + i);
#pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = to_f(v.v[e]);
  }
}

// What both vector kernels compute for a q or k row before they differ: the lane's four inputs
// in float32, the row's 1/rms (the generic row_rrms' formula), the lane's scales and its two
// pairs' cos/sin.
template <typename T>
struct VecRow {
  float a[4], r, scv[4], cv[2], sv[2];
};

template <typename T>
__device__ __forceinline__ VecRow<T> vec_row(const Vec4<T>& x, const ScaleRef<T>& scale, const float* cos_t,
                                             const float* sin_t, uint32_t l, int lane) {
  constexpr int D = kVecD;
  VecRow<T> w;
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    w.a[e] = to_f(x.v[e]);
    ss = __fadd_rn(ss, __fmul_rn(w.a[e], w.a[e]));
  }
  ss = warp_sum(ss);
  w.r = 1.f / sqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(D)), kEps));
  load_scale4(scale, 4 * lane, w.scv);
  const float2 cs = *reinterpret_cast<const float2*>(cos_t + l * (D / 2) + 2 * lane);
  const float2 sn = *reinterpret_cast<const float2*>(sin_t + l * (D / 2) + 2 * lane);
  w.cv[0] = cs.x, w.cv[1] = cs.y, w.sv[0] = sn.x, w.sv[1] = sn.y;
  return w;
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

// Each warp takes kVecRows consecutive rows and issues all their loads before any arithmetic,
// so that more than one 8-byte load per lane is in flight. Measured on the H200 at 512/1024/128
// (session 11): backward 18.7 -> 14.1 ms per step, forward 6.4 -> 7.6 ms; both still far from
// their ~7 ms of memory traffic, for a reason not yet found. Rows stay warp-uniform, so the
// warp sums are unchanged.
constexpr int kVecRows = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    qk_norm_rope_forward_vec_kernel(Segments<T> segs, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                    T* __restrict__ q, T* __restrict__ k, T* __restrict__ v, uint32_t L,
                                    uint32_t heads, uint32_t rows) {
  constexpr int D = kVecD;
  const int lane = threadIdx.x & 31;
  const uint32_t row0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * kVecRows;
  RowIndex32 ix[kVecRows];
  Vec4<T> x[kVecRows];
  const Segment<T>* sg[kVecRows];
#pragma unroll
  for (int i = 0; i < kVecRows; ++i) {
    if (row0 + i >= rows) break;  // uniform over the warp
    ix[i] = row_index32(row0 + i, heads, L);
    sg[i] = (segs.n > 1 && ix[i].l >= segs.s[1].l0) ? &segs.s[1] : &segs.s[0];
    x[i] = load4(sg[i]->qkv + ix[i].b * sg[i]->sB + (ix[i].l - sg[i]->l0) * sg[i]->sL +
                 (ix[i].t * heads + ix[i].h) * D + 4 * lane);
  }
#pragma unroll
  for (int i = 0; i < kVecRows; ++i) {
    if (row0 + i >= rows) break;
    const int64_t out_off = ((static_cast<int64_t>(ix[i].b) * L + ix[i].l) * heads + ix[i].h) * D + 4 * lane;
    if (ix[i].t == 2) {
      store4(v + out_off, x[i]);
      continue;
    }
    const VecRow<T> w = vec_row(x[i], ix[i].t == 0 ? sg[i]->q_scale : sg[i]->k_scale, cos_t, sin_t, ix[i].l, lane);
    Vec4<T> o;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const float y0 = round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(w.a[2 * p], w.r)), w.scv[2 * p]));
      const float y1 = round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(w.a[2 * p + 1], w.r)), w.scv[2 * p + 1]));
      o.v[2 * p] = from_f<T>(__fsub_rn(__fmul_rn(w.cv[p], y0), __fmul_rn(w.sv[p], y1)));
      o.v[2 * p + 1] = from_f<T>(__fadd_rn(__fmul_rn(w.sv[p], y0), __fmul_rn(w.cv[p], y1)));
    }
    store4((ix[i].t == 0 ? q : k) + out_off, o);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    qk_norm_rope_backward_vec_kernel(Segments<T> segs, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, Grad<T> gq, Grad<T> gk, Grad<T> gv, uint32_t L,
                                     uint32_t heads, uint32_t rows) {
  constexpr int D = kVecD;
  const int lane = threadIdx.x & 31;
  const uint32_t row0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * kVecRows;
  RowIndex32 ix[kVecRows];
  Vec4<T> gvec[kVecRows], x[kVecRows];
  const Segment<T>* sg[kVecRows];
  bool has_g[kVecRows];
#pragma unroll
  for (int i = 0; i < kVecRows; ++i) {
    if (row0 + i >= rows) break;  // uniform over the warp
    ix[i] = row_index32(row0 + i, heads, L);
    sg[i] = (segs.n > 1 && ix[i].l >= segs.s[1].l0) ? &segs.s[1] : &segs.s[0];
    const Grad<T>& gr = ix[i].t == 0 ? gq : ix[i].t == 1 ? gk : gv;
    has_g[i] = gr.p != nullptr && sg[i]->dqkv != nullptr;
    if (!has_g[i]) continue;
    gvec[i] = load4(gr.p + ix[i].b * gr.sB + ix[i].h * gr.sH + ix[i].l * gr.sL + 4 * lane);
    if (ix[i].t != 2)
      x[i] = load4(sg[i]->qkv + ix[i].b * sg[i]->sB + (ix[i].l - sg[i]->l0) * sg[i]->sL +
                   (ix[i].t * heads + ix[i].h) * D + 4 * lane);
  }
#pragma unroll
  for (int i = 0; i < kVecRows; ++i) {
    if (row0 + i >= rows) break;
    if (sg[i]->dqkv == nullptr) continue;
    const int64_t li = ix[i].l - sg[i]->l0;
    T* dst = sg[i]->dqkv + ((ix[i].b * sg[i]->L + li) * 3 + ix[i].t) * heads * D + ix[i].h * D + 4 * lane;
    if (!has_g[i]) {
      Vec4<T> z;
#pragma unroll
      for (int e = 0; e < 4; ++e) z.v[e] = from_f<T>(0.f);
      store4(dst, z);
      continue;
    }
    if (ix[i].t == 2) {
      store4(dst, gvec[i]);
      continue;
    }
    const VecRow<T> w = vec_row(x[i], ix[i].t == 0 ? sg[i]->q_scale : sg[i]->k_scale, cos_t, sin_t, ix[i].l, lane);
    // dy: the gradient rotated back, rounded to T (as in the generic kernel).
    float dy[4];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const float g0 = to_f(gvec[i].v[2 * p]), g1 = to_f(gvec[i].v[2 * p + 1]);
      dy[2 * p] = round_to<T>(__fadd_rn(__fmul_rn(w.cv[p], g0), __fmul_rn(w.sv[p], g1)));
      dy[2 * p + 1] = round_to<T>(__fsub_rn(__fmul_rn(w.cv[p], g1), __fmul_rn(w.sv[p], g0)));
    }
    float sgx = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) sgx += (dy[e] * w.scv[e]) * (w.a[e] * w.r);
    const float m = warp_sum(sgx) / static_cast<float>(D);
    Vec4<T> o;
#pragma unroll
    for (int e = 0; e < 4; ++e) o.v[e] = from_f<T>(w.r * (dy[e] * w.scv[e] - (w.a[e] * w.r) * m));
    store4(dst, o);
  }
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether the D == 128 vector kernels may run: every row start aligned to 4 elements, scales to
// 4 elements, cos/sin to 8, and the row count within 32-bit indexing.
bool vec_path_ok(const std::vector<QkvSegment>& segs, const std::vector<at::Tensor>& qs,
                 const std::vector<at::Tensor>& ks, const at::Tensor& cos, const at::Tensor& sin,
                 const std::vector<const at::Tensor*>& grads, int64_t D, int64_t rows, int64_t L, int64_t heads) {
  if (D != kVecD || rows >= (int64_t{1} << 31) || L * heads * D >= (int64_t{1} << 31)) return false;
  const size_t e = segs[0].qkv.element_size(), row_bytes = 4 * e;
  for (const auto& s : segs)
    if (!aligned_to(s.qkv.data_ptr(), row_bytes) || s.qkv.stride(0) % 4 != 0 || s.qkv.stride(1) % 4 != 0) return false;
  for (const auto* v : {&qs, &ks})
    for (const auto& t : *v)
      if (!aligned_to(t.data_ptr(), 4 * t.element_size())) return false;
  if (!aligned_to(cos.data_ptr(), 8) || !aligned_to(sin.data_ptr(), 8)) return false;
  for (const at::Tensor* g : grads)
    if (g->defined() && (!aligned_to(g->data_ptr(), row_bytes) || g->stride(0) % 4 != 0 || g->stride(1) % 4 != 0 ||
                         g->stride(2) % 4 != 0))
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
  const int64_t vec_blocks = (rows + kWarps * kVecRows - 1) / (kWarps * kVecRows);
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
  const int64_t vec_blocks = (rows + kWarps * kVecRows - 1) / (kWarps * kVecRows);

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
