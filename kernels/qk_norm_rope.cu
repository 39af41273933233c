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

#include "kernels/qk_norm_rope.h"

namespace fluxtrain::kernels {
namespace {

constexpr int kThreads = 256;  // 8 warps = 8 rows per block
constexpr int kWarps = kThreads / 32;
constexpr float kEps = 1e-6f;

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
// v rounded to T and back (identity for float).
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
struct Segment {
  const T* qkv;          // [B, L, 3, heads, D] with batch stride sB and token stride sL (elements)
  T* dqkv;               // backward: contiguous [B, L, 3*heads*D], null when not needed
  const float* q_scale;  // [D] float32
  const float* k_scale;
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
  const int64_t out_off = ((ix.b * heads + ix.h) * L + ix.l) * D;
  if (ix.t == 2) {
    T* dst = v + out_off;
    for (int64_t d = lane; d < D; d += 32) dst[d] = src[d];
    return;
  }
  T* dst = (ix.t == 0 ? q : k) + out_off;
  const float* scale = ix.t == 0 ? sg.q_scale : sg.k_scale;
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
  const float* scale = ix.t == 0 ? sg.q_scale : sg.k_scale;
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
    s.q_scale = qs[i].data_ptr<float>();
    s.k_scale = ks[i].data_ptr<float>();
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

// Float32 contiguous copies of the scales (exact for bf16/fp16), kept alive by the caller.
void float_scales(const std::vector<QkvSegment>& segs, std::vector<at::Tensor>& qs, std::vector<at::Tensor>& ks) {
  for (const auto& s : segs) {
    qs.push_back(s.q_scale.to(at::kFloat).contiguous().view({-1}));
    ks.push_back(s.k_scale.to(at::kFloat).contiguous().view({-1}));
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
  at::Tensor q = at::empty({B, heads, L, D}, q0.options());
  at::Tensor k = at::empty({B, heads, L, D}, q0.options());
  at::Tensor v = at::empty({B, heads, L, D}, q0.options());
  const int64_t rows = B * L * 3 * heads;
  if (rows == 0) return {q, k, v};
  std::vector<at::Tensor> qs, ks;
  float_scales(segs, qs, ks);
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  TORCH_CHECK(blocks <= 0x7fffffff, "qk_norm_rope_forward_cuda: too many rows");
  auto stream = at::cuda::getCurrentCUDAStream();
#define FLUXTRAIN_QKNR_FWD(T)                                                                                      \
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
  float_scales(segs, qs, ks);
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  TORCH_CHECK(blocks <= 0x7fffffff, "qk_norm_rope_backward_cuda: too many rows");
  auto stream = at::cuda::getCurrentCUDAStream();
#define FLUXTRAIN_QKNR_BWD(T)                                                                                   \
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
