// Fused modulated LayerNorm (kernels/modulated_layer_norm.h). One block per [H] row: x is read in
// its dtype, statistics are float32 block sums (warp shuffles, then one float per warp in shared
// memory, summed in the same order by every thread: deterministic), mean first and then the
// biased variance of (x - mean), and the output is rounded once. Two versions of each row kernel:
// the vector kernels (below; H a multiple of 256, aligned operands: FLUX's 3072) hold the row in
// registers and read it once with 16-byte accesses; the general ones (256 threads, one element at
// a time, the row read again from L1/L2 for each pass) take every other shape.
// Backward: the same row layout for dx, optionally plus a second gradient of x (dx_add); dshift/
// dscale are column sums over L, done by a third kernel that writes float32 partial sums per chunk
// of 32 rows, summed by ATen (deterministic).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <initializer_list>
#include <type_traits>

#include "kernels/cuda_dtype.cuh"
#include "kernels/modulated_layer_norm.h"

namespace fluxtrain::kernels {
namespace {

constexpr int kRowThreads = 256;   // multiple of 32, at most 1024
constexpr int kColThreads = 256;
constexpr int64_t kChunkRows = 32;  // rows per partial sum of dshift/dscale
constexpr float kEps = 1e-6f;


// Sum of v over the block. shm: at least blockDim.x / 32 floats. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* shm) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // earlier readers of shm are done
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  float t = 0.f;
  for (int i = 0; i < warps; ++i) t += shm[i];
  return t;
}

// The same for two sums at once.
__device__ __forceinline__ float2 block_sum2(float a, float b, float2* shm) {
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) shm[warp] = make_float2(a, b);
  __syncthreads();
  float2 t = make_float2(0.f, 0.f);
  for (int i = 0; i < warps; ++i) {
    t.x += shm[i].x;
    t.y += shm[i].y;
  }
  return t;
}

// The per-element formulas, shared by the general and the vector kernels (float32, rounded once).
template <typename T>
__device__ __forceinline__ T mln_y(float x, float mean, float rstd, float scale, float shift) {
  const float xh = (x - mean) * rstd;
  return from_f<T>(xh * (1.f + scale) + shift);
}
// dx from the row's mean_H(g) (mg) and mean_H(g * xhat) (mgx), plus an added gradient.
template <typename T>
__device__ __forceinline__ T mln_dx(float x, float dy, float scale, float m, float r, float mg, float mgx, float add) {
  const float xh = (x - m) * r;
  const float g = dy * (1.f + scale);
  return from_f<T>(r * (g - mg - xh * mgx) + add);
}

// grid.x = B * L rows. x row (b, l) at x + b*sxB + l*sxL; shift/scale row b at + b*sB; y, mean,
// rstd contiguous.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    mln_forward_kernel(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                       T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t L,
                       int64_t H, int64_t sxB, int64_t sxL, int64_t sB) {
  __shared__ float shm[32];
  const int64_t row = blockIdx.x;
  const int64_t b = row / L, l = row % L;
  const T* xr = x + b * sxB + l * sxL;
  const float inv_h = 1.f / static_cast<float>(H);

  float s = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) s += to_f(xr[i]);
  const float mean = block_sum(s, shm) * inv_h;
  float v = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const float d = to_f(xr[i]) - mean;
    v += d * d;
  }
  const float rstd = 1.f / sqrtf(block_sum(v, shm) * inv_h + kEps);

  const T* sh = shift + b * sB;
  const T* sc = scale + b * sB;
  T* yr = y + row * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    yr[i] = mln_y<T>(to_f(xr[i]), mean, rstd, to_f(sc[i]), to_f(sh[i]));
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dx for row (b, l); dy and dx contiguous [B, L, H].
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    mln_backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ scale,
                           const float* __restrict__ mean, const float* __restrict__ rstd,
                           const T* __restrict__ dadd, T* __restrict__ dx, int64_t L, int64_t H, int64_t sxB,
                           int64_t sxL, int64_t sB) {
  __shared__ float2 shm[32];
  const int64_t row = blockIdx.x;
  const int64_t b = row / L, l = row % L;
  const T* xr = x + b * sxB + l * sxL;
  const T* dyr = dy + row * H;
  const T* sc = scale + b * sB;
  const float m = mean[row], r = rstd[row];
  const float inv_h = 1.f / static_cast<float>(H);

  float sg = 0.f, sgx = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const float xh = (to_f(xr[i]) - m) * r;
    const float g = to_f(dyr[i]) * (1.f + to_f(sc[i]));
    sg += g;
    sgx += g * xh;
  }
  const float2 t = block_sum2(sg, sgx, shm);
  const float mg = t.x * inv_h, mgx = t.y * inv_h;
  T* dxr = dx + row * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const float add = dadd ? to_f(dadd[row * H + i]) : 0.f;
    dxr[i] = mln_dx<T>(to_f(xr[i]), to_f(dyr[i]), to_f(sc[i]), m, r, mg, mgx, add);
  }
}

// Partial column sums: grid (ceil(H / kColThreads), chunks, B); thread h of chunk c of batch b
// sums rows l in [c*kChunkRows, (c+1)*kChunkRows) and writes partial[(b*chunks + c)*H + h].
// pshift / pscale may be null (not needed).
template <typename T>
__global__ void __launch_bounds__(kColThreads)
    mln_backward_dparams_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
                                const float* __restrict__ rstd, float* __restrict__ pshift,
                                float* __restrict__ pscale, int64_t L, int64_t H, int64_t sxB, int64_t sxL) {
  const int64_t h = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (h >= H) return;
  const int64_t c = blockIdx.y, b = blockIdx.z, chunks = gridDim.y;
  const int64_t l0 = c * kChunkRows;
  const int64_t l1 = l0 + kChunkRows < L ? l0 + kChunkRows : L;
  float ssh = 0.f, ssc = 0.f;
  for (int64_t l = l0; l < l1; ++l) {
    const int64_t row = b * L + l;
    const float d = to_f(dy[row * H + h]);
    ssh += d;
    if (pscale) ssc += d * ((to_f(x[b * sxB + l * sxL + h]) - mean[row]) * rstd[row]);
  }
  const int64_t o = (b * chunks + c) * H + h;
  if (pshift) pshift[o] = ssh;
  if (pscale) pscale[o] = ssc;
}

// ---- Fast path: one block per row, the row held in registers. Each of the block's H / (8 * V)
// threads holds V vectors of 8 elements (16-byte accesses for bf16/fp16, two for float32), so x
// is read from memory once; the kernels above read it up to three times with 2-byte accesses
// and measured 0.8-1.3 TB/s at 512/1024/128 (session 8). FLUX (H = 3072): V = 4, 96 threads.
// Same formulas and roundings as above; only the order of the float32 row sums differs.
constexpr int kVecElems = kVec8;  // one Vec8 (kernels/cuda_dtype.cuh)

// Thread t's vector n covers elements (n * blockDim.x + t) * 8 .. + 7: each access of the
// block is blockDim.x neighbouring vectors.
__device__ __forceinline__ int64_t vec_col(int n) {
  return (static_cast<int64_t>(n) * blockDim.x + threadIdx.x) * kVecElems;
}

template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads)
    mln_forward_vec_kernel(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                           T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t L,
                           int64_t H, int64_t sxB, int64_t sxL, int64_t sB) {
  __shared__ float shm[32];
  const int64_t row = blockIdx.x;
  const int64_t b = row / L, l = row % L;
  const T* xr = x + b * sxB + l * sxL;
  Vec8<T> xv[V];
#pragma unroll
  for (int n = 0; n < V; ++n) xv[n] = load8(xr + vec_col(n));
  const float inv_h = 1.f / static_cast<float>(H);
  float s = 0.f;
#pragma unroll
  for (int n = 0; n < V; ++n)
#pragma unroll
    for (int e = 0; e < kVecElems; ++e) s += to_f(xv[n].v[e]);
  const float mean = block_sum(s, shm) * inv_h;
  float v = 0.f;
#pragma unroll
  for (int n = 0; n < V; ++n)
#pragma unroll
    for (int e = 0; e < kVecElems; ++e) {
      const float d = to_f(xv[n].v[e]) - mean;
      v += d * d;
    }
  const float rstd = 1.f / sqrtf(block_sum(v, shm) * inv_h + kEps);
  const T* sh = shift + b * sB;
  const T* sc = scale + b * sB;
  T* yr = y + row * H;
#pragma unroll
  for (int n = 0; n < V; ++n) {
    const int64_t c = vec_col(n);
    const Vec8<T> shv = load8(sh + c), scv = load8(sc + c);
    Vec8<T> o;
#pragma unroll
    for (int e = 0; e < kVecElems; ++e)
      o.v[e] = mln_y<T>(to_f(xv[n].v[e]), mean, rstd, to_f(scv.v[e]), to_f(shv.v[e]));
    store8(yr + c, o);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads)
    mln_backward_dx_vec_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ scale,
                               const float* __restrict__ mean, const float* __restrict__ rstd,
                               const T* __restrict__ dadd, T* __restrict__ dx, int64_t L, int64_t H, int64_t sxB,
                               int64_t sxL, int64_t sB) {
  __shared__ float2 shm[32];
  const int64_t row = blockIdx.x;
  const int64_t b = row / L, l = row % L;
  const T* xr = x + b * sxB + l * sxL;
  const T* dyr = dy + row * H;
  const T* sc = scale + b * sB;
  Vec8<T> xv[V], dv[V], sv[V];
#pragma unroll
  for (int n = 0; n < V; ++n) {
    xv[n] = load8(xr + vec_col(n));
    dv[n] = load8(dyr + vec_col(n));
    sv[n] = load8(sc + vec_col(n));
  }
  const float m = mean[row], r = rstd[row];
  const float inv_h = 1.f / static_cast<float>(H);
  float sg = 0.f, sgx = 0.f;
#pragma unroll
  for (int n = 0; n < V; ++n)
#pragma unroll
    for (int e = 0; e < kVecElems; ++e) {
      const float xh = (to_f(xv[n].v[e]) - m) * r;
      const float g = to_f(dv[n].v[e]) * (1.f + to_f(sv[n].v[e]));
      sg += g;
      sgx += g * xh;
    }
  // The added gradient is loaded before the block's sums, so that its latency overlaps them
  // (loaded after them, the dx kernel measured twice as slow: 5.2 against 2.7 ms per step).
  Vec8<T> av[V];
  if (dadd) {
#pragma unroll
    for (int n = 0; n < V; ++n) av[n] = load8(dadd + row * H + vec_col(n));
  }
  const float2 t = block_sum2(sg, sgx, shm);
  const float mg = t.x * inv_h, mgx = t.y * inv_h;
  T* dxr = dx + row * H;
#pragma unroll
  for (int n = 0; n < V; ++n) {
    Vec8<T> o;
#pragma unroll
    for (int e = 0; e < kVecElems; ++e)
      o.v[e] = mln_dx<T>(to_f(xv[n].v[e]), to_f(dv[n].v[e]), to_f(sv[n].v[e]), m, r, mg, mgx,
                         dadd ? to_f(av[n].v[e]) : 0.f);
    store8(dxr + vec_col(n), o);
  }
}

bool mln_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// V of the vector kernels for this H: the largest of 4, 2, 1 (at most max_v) that gives a whole
// number of warps (at most kRowThreads threads) per row; 0: none (the kernels above run).
// The backward takes at most 2 (kBwdMaxV): it holds x, dy, scale and the added gradient, and at
// V = 4 it needed 176 registers per thread, a third of the SM's warps.
constexpr int kBwdMaxV = 2;
int mln_vec_v(int64_t H, int max_v = 4) {
  for (int v : {4, 2, 1}) {
    if (v > max_v) continue;
    const int64_t per = int64_t{32} * kVecElems * v;
    if (H % per == 0 && H / (kVecElems * v) <= kRowThreads) return v;
  }
  return 0;
}

// Whether the operands allow the vector kernels' aligned accesses: row starts (strides of dims
// 0 and 1, data pointers) aligned to 8 elements, and shift/scale's batch stride sB too.
bool mln_vec_ok(int64_t H, size_t esize, std::initializer_list<const at::Tensor*> rowwise, int64_t sB,
                int max_v = 4) {
  if (mln_vec_v(H, max_v) == 0 || sB % kVecElems != 0) return false;
  for (const at::Tensor* t : rowwise)
    if (!mln_aligned(t->data_ptr(), kVecElems * esize) || t->stride(0) % kVecElems != 0 ||
        t->stride(1) % kVecElems != 0)
      return false;
  return true;
}

// Calls f(std::integral_constant<int, V>) for H's V (mln_vec_v(H, MaxV) != 0); only the V up to
// MaxV are instantiated.
template <int MaxV, typename F>
void with_vec_v(int64_t H, F&& f) {
  switch (mln_vec_v(H, MaxV)) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 4:
      if constexpr (MaxV >= 4) {
        f(std::integral_constant<int, 4>());
        break;
      }
      [[fallthrough]];
    default: TORCH_CHECK(false, "modulated_layer_norm: no vector kernel for H = ", H);
  }
}

}  // namespace

std::array<at::Tensor, 3> modulated_layer_norm_forward_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                            const at::Tensor& scale) {
  TORCH_CHECK(modulated_layer_norm_cuda_supported(x, shift, scale),
              "modulated_layer_norm_forward_cuda: unsupported arguments");
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2);
  TORCH_CHECK(B * L <= 0x7fffffff, "modulated_layer_norm_forward_cuda: too many rows");
  // shift/scale are usually chunks of one [B, 1, 6H] modulation tensor: read in place when they
  // share a batch stride (one index for both), copied (B*H elements) otherwise.
  at::Tensor sh = shift, sc = scale;
  if (sh.stride(2) != 1 || sc.stride(2) != 1 || (B > 1 && sh.stride(0) != sc.stride(0))) {
    sh = shift.contiguous();
    sc = scale.contiguous();
  }
  const int64_t sB = B > 1 ? sc.stride(0) : 0;
  at::Tensor y = at::empty({B, L, H}, x.options());
  at::Tensor mean = at::empty({B, L}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({B, L}, x.options().dtype(at::kFloat));
  if (B * L == 0) return {y, mean, rstd};
  auto stream = at::cuda::getCurrentCUDAStream();
  if (mln_vec_ok(H, x.element_size(), {&x, &sh, &sc}, sB)) {
    const unsigned threads = static_cast<unsigned>(H / (kVecElems * mln_vec_v(H)));
    auto launch = [&](auto n) {
      constexpr int V = decltype(n)::value;
#define FLUXTRAIN_MLN_FWD_VEC(T, AT)                                                                              \
  mln_forward_vec_kernel<T, V><<<static_cast<unsigned>(B * L), threads, 0, stream>>>(                                                 \
      reinterpret_cast<const T*>(x.data_ptr<AT>()), reinterpret_cast<const T*>(sh.data_ptr<AT>()),                 \
      reinterpret_cast<const T*>(sc.data_ptr<AT>()), reinterpret_cast<T*>(y.data_ptr<AT>()), mean.data_ptr<float>(), \
      rstd.data_ptr<float>(), L, H, x.stride(0), x.stride(1), sB)
      switch (x.scalar_type()) {
        case at::kBFloat16: FLUXTRAIN_MLN_FWD_VEC(__nv_bfloat16, at::BFloat16); break;
        case at::kHalf: FLUXTRAIN_MLN_FWD_VEC(__half, at::Half); break;
        case at::kFloat: FLUXTRAIN_MLN_FWD_VEC(float, float); break;
        default: TORCH_CHECK(false, "modulated_layer_norm_forward_cuda: unsupported dtype ", x.scalar_type());
      }
#undef FLUXTRAIN_MLN_FWD_VEC
    };
    with_vec_v<4>(H, launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {y, mean, rstd};
  }
#define FLUXTRAIN_MLN_FWD(T, AT)                                                                                    \
  mln_forward_kernel<T><<<static_cast<unsigned>(B * L), kRowThreads, 0, stream>>>(                                                          \
      reinterpret_cast<const T*>(x.data_ptr<AT>()), reinterpret_cast<const T*>(sh.data_ptr<AT>()),                   \
      reinterpret_cast<const T*>(sc.data_ptr<AT>()), reinterpret_cast<T*>(y.data_ptr<AT>()), mean.data_ptr<float>(), \
      rstd.data_ptr<float>(), L, H, x.stride(0), x.stride(1), sB)
  switch (x.scalar_type()) {
    case at::kBFloat16: FLUXTRAIN_MLN_FWD(__nv_bfloat16, at::BFloat16); break;
    case at::kHalf: FLUXTRAIN_MLN_FWD(__half, at::Half); break;
    case at::kFloat: FLUXTRAIN_MLN_FWD(float, float); break;
    default: TORCH_CHECK(false, "modulated_layer_norm_forward_cuda: unsupported dtype ", x.scalar_type());
  }
#undef FLUXTRAIN_MLN_FWD
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::array<at::Tensor, 3> modulated_layer_norm_backward_cuda(const at::Tensor& dy_in, const at::Tensor& x,
                                                             const at::Tensor& scale, const at::Tensor& mean_in,
                                                             const at::Tensor& rstd_in, bool need_dx, bool need_dshift,
                                                             bool need_dscale, const at::Tensor& dx_add) {
  TORCH_CHECK(modulated_layer_norm_cuda_supported(x, scale, scale) && dy_in.sizes() == x.sizes() &&
                  mean_in.scalar_type() == at::kFloat && rstd_in.scalar_type() == at::kFloat,
              "modulated_layer_norm_backward_cuda: unsupported arguments");
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2);
  at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();
  at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor sc = scale.contiguous();
  // The added gradient, contiguous in x's dtype (a view of dy's size; undefined: none).
  const at::Tensor dadd = dx_add.defined() ? dx_add.to(x.scalar_type()).contiguous() : at::Tensor();
  TORCH_CHECK(B * L <= 0x7fffffff, "modulated_layer_norm_backward_cuda: too many rows");
  at::Tensor dx, dshift, dscale;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (need_dx) {
    dx = at::empty({B, L, H}, x.options());
    const int64_t sB = B > 1 ? sc.stride(0) : 0;
    const bool vec = dadd.defined() ? mln_vec_ok(H, x.element_size(), {&x, &dy, &sc, &dadd}, sB, kBwdMaxV)
                                    : mln_vec_ok(H, x.element_size(), {&x, &dy, &sc}, sB, kBwdMaxV);
    if (B * L > 0 && vec) {
      const unsigned threads = static_cast<unsigned>(H / (kVecElems * mln_vec_v(H, kBwdMaxV)));
      auto launch = [&](auto n) {
        constexpr int V = decltype(n)::value;
#define FLUXTRAIN_MLN_BWD_VEC(T, AT)                                                                              \
  mln_backward_dx_vec_kernel<T, V><<<static_cast<unsigned>(B * L), threads, 0, stream>>>(                                             \
      reinterpret_cast<const T*>(dy.data_ptr<AT>()), reinterpret_cast<const T*>(x.data_ptr<AT>()),                 \
      reinterpret_cast<const T*>(sc.data_ptr<AT>()), mean.data_ptr<float>(), rstd.data_ptr<float>(),              \
      dadd.defined() ? reinterpret_cast<const T*>(dadd.data_ptr<AT>()) : nullptr,                                  \
      reinterpret_cast<T*>(dx.data_ptr<AT>()), L, H, x.stride(0), x.stride(1), sB)
        switch (x.scalar_type()) {
          case at::kBFloat16: FLUXTRAIN_MLN_BWD_VEC(__nv_bfloat16, at::BFloat16); break;
          case at::kHalf: FLUXTRAIN_MLN_BWD_VEC(__half, at::Half); break;
          case at::kFloat: FLUXTRAIN_MLN_BWD_VEC(float, float); break;
          default: TORCH_CHECK(false, "modulated_layer_norm_backward_cuda: unsupported dtype ", x.scalar_type());
        }
#undef FLUXTRAIN_MLN_BWD_VEC
      };
      with_vec_v<kBwdMaxV>(H, launch);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (B * L > 0) {
#define FLUXTRAIN_MLN_BWD(T, AT)                                                                                      \
  mln_backward_dx_kernel<T><<<static_cast<unsigned>(B * L), kRowThreads, 0, stream>>>(                                                        \
      reinterpret_cast<const T*>(dy.data_ptr<AT>()), reinterpret_cast<const T*>(x.data_ptr<AT>()),                     \
      reinterpret_cast<const T*>(sc.data_ptr<AT>()), mean.data_ptr<float>(), rstd.data_ptr<float>(),                  \
      dadd.defined() ? reinterpret_cast<const T*>(dadd.data_ptr<AT>()) : nullptr,                                      \
      reinterpret_cast<T*>(dx.data_ptr<AT>()), L, H, x.stride(0), x.stride(1), H)
      switch (x.scalar_type()) {
        case at::kBFloat16: FLUXTRAIN_MLN_BWD(__nv_bfloat16, at::BFloat16); break;
        case at::kHalf: FLUXTRAIN_MLN_BWD(__half, at::Half); break;
        case at::kFloat: FLUXTRAIN_MLN_BWD(float, float); break;
        default: TORCH_CHECK(false, "modulated_layer_norm_backward_cuda: unsupported dtype ", x.scalar_type());
      }
#undef FLUXTRAIN_MLN_BWD
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (need_dshift || need_dscale) {
    const int64_t chunks = (L + kChunkRows - 1) / kChunkRows;
    if (chunks == 0) {  // L == 0: the sums are zero
      if (need_dshift) dshift = at::zeros({B, 1, H}, scale.options());
      if (need_dscale) dscale = at::zeros({B, 1, H}, scale.options());
    } else {
      TORCH_CHECK(chunks <= 65535 && B <= 65535, "modulated_layer_norm_backward_cuda: too many rows");
      auto fopt = x.options().dtype(at::kFloat);
      at::Tensor pshift = need_dshift ? at::empty({B, chunks, H}, fopt) : at::Tensor();
      at::Tensor pscale = need_dscale ? at::empty({B, chunks, H}, fopt) : at::Tensor();
      float* psh = need_dshift ? pshift.data_ptr<float>() : nullptr;
      float* psc = need_dscale ? pscale.data_ptr<float>() : nullptr;
      const dim3 grid(static_cast<unsigned>((H + kColThreads - 1) / kColThreads), static_cast<unsigned>(chunks),
                      static_cast<unsigned>(B));
#define FLUXTRAIN_MLN_DP(T, AT)                                                                                    \
  mln_backward_dparams_kernel<T><<<grid, kColThreads, 0, stream>>>(                                                 \
      reinterpret_cast<const T*>(dy.data_ptr<AT>()), reinterpret_cast<const T*>(x.data_ptr<AT>()),                  \
      mean.data_ptr<float>(), rstd.data_ptr<float>(), psh, psc, L, H, x.stride(0), x.stride(1))
      switch (x.scalar_type()) {
        case at::kBFloat16: FLUXTRAIN_MLN_DP(__nv_bfloat16, at::BFloat16); break;
        case at::kHalf: FLUXTRAIN_MLN_DP(__half, at::Half); break;
        case at::kFloat: FLUXTRAIN_MLN_DP(float, float); break;
        default: TORCH_CHECK(false, "modulated_layer_norm_backward_cuda: unsupported dtype ", x.scalar_type());
      }
#undef FLUXTRAIN_MLN_DP
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_dshift) dshift = pshift.sum(1, /*keepdim=*/true).to(scale.scalar_type());
      if (need_dscale) dscale = pscale.sum(1, /*keepdim=*/true).to(scale.scalar_type());
    }
  }
  return {dx, dshift, dscale};
}

}  // namespace fluxtrain::kernels
