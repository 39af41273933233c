// FLUX's attention prologue fused: head split + QK RMSNorm + RoPE (+ v's transpose).
//
// A qkv GEMM output [B, L, 3*heads*D] is read as [B, L, 3, heads, D]; q and k rows (D values of
// one token and head) get RMSNorm over D (eps 1e-6, float32 statistics, learned scale [D]) and
// then the rotary embedding of their token (pairs (2j, 2j+1), cos/sin [L, D/2] float32); v is
// copied. Outputs are q, k, v as [B, heads, L, D] views of dense [B, L, heads, D] memory on the
// GPU (the reference returns contiguous [B, heads, L, D]; values are the same). That token-major
// layout is the one the attention kernels work in (flash attention and cuDNN take it without a
// copy, cuDNN allocates dq/dk/dv and the output in it), so that: this kernel writes in the order it
// reads; backward reads the gradients in the order it writes dqkv; and merging the attention
// output's heads is a view, not a transpose copy (session 11: −9 to −15 ms per step on the H200,
// docs/benchmarks.md; this kernel's own time did not change).
//
// Streams. A double block attends over cat(text, image) tokens, but text and image have their
// own qkv GEMM and their own norm scales. Rather than one call per stream followed by at::cat of
// q, k and v (three extra copies of [B, heads, L, D] forward, and narrow+copy backward), the
// function takes the streams as segments, in token order, and writes each segment's rows
// straight into its token range of the shared outputs; cos/sin cover all tokens (rows
// [0, sum L_i)). Backward writes each segment's own dqkv. At most three segments: a double
// block passes text, image and condition tokens (the condition tokens use the image stream's
// scales), a single block its main and condition tokens as one segment or two.
//
// Gradient pieces. The main queries attend over all keys, each condition's queries only over the
// condition's keys: the caller takes q of the main tokens, and k, v of all tokens, for one
// attention call, and q, k, v of the condition tokens (views of the same outputs) for the other.
// Their gradients come back in pieces that cover parts of the token range: dq as a main piece
// and a condition piece, dk as a piece over all tokens and a condition piece. Backward sums the
// pieces of a token as it reads them (one rounding to the dtype, as autograd's sum of the two
// gradients), so that neither the forward concatenation of keys and values nor the backward sum
// and slice copies exist (session 13, docs/benchmarks.md).
//
// Rounding. The unfused path rounds three times for q and k in a 16-bit dtype: the normalised
// x * r to the dtype, the product with the scale to the dtype, and the rotation (float32) to the
// dtype. The CUDA kernel keeps all three roundings and does each float32 operation in the same
// order with the same single rounding (explicit __fmul_rn/__fadd_rn: no FMA contraction), so it
// equals the reference below bit for bit except where 1/rms differs in its last float32 bit
// (a different summation order of the D squares): then by one ulp of the dtype at most, and
// rarely. Backward likewise rounds the inverse-rotated gradient to the dtype before the RMSNorm
// backward (as the unfused RopeFunction does) and rounds dx once.
#pragma once
#include <array>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fluxtrain::kernels {

// One stream's qkv [B, L_i, 3*heads*D] (strides free except a contiguous last dim on the GPU
// path) and its norm scales [D] (of qkv's dtype or float32).
struct QkvSegment {
  at::Tensor qkv, q_scale, k_scale;
};

// Returns {q, k, v}, each [B, heads, L, D] in qkv's dtype (contiguous from the reference, a view
// of [B, L, heads, D] memory from the CUDA kernel), L = sum of the segments' L_i. cos, sin: [L, D/2] (float32; float64 for float64 qkv).
std::array<at::Tensor, 3> qk_norm_rope_forward(const std::vector<QkvSegment>& segs, int64_t heads,
                                               const at::Tensor& cos, const at::Tensor& sin);

// A gradient of q, k or v in up to two pieces, each [B, heads, L_p, D] (any strides) covering
// tokens [first, first + L_p); a token's gradient is the sum of the pieces that cover it (in the
// dtype: one rounding when two do), zero where none does. Undefined pieces are absent.
struct GradPieces {
  at::Tensor a;
  int64_t a_first = 0;
  at::Tensor b;
  int64_t b_first = 0;
  GradPieces() = default;
  GradPieces(at::Tensor whole) : a(std::move(whole)) {}  // NOLINT: one piece over every token
  GradPieces(at::Tensor a_, int64_t a0, at::Tensor b_, int64_t b0)
      : a(std::move(a_)), a_first(a0), b(std::move(b_)), b_first(b0) {}
  bool defined() const { return a.defined() || b.defined(); }
};

// Which gradients a segment wants.
struct QkvSegmentNeeds {
  bool qkv = true, q_scale = false, k_scale = false;
};
struct QkvSegmentGrads {
  at::Tensor qkv;               // [B, L_i, 3*heads*D] contiguous, qkv's dtype (undefined if not needed)
  at::Tensor q_scale, k_scale;  // [D] in the scale's dtype (undefined if not needed)
};
// dq, dk, dv: [B, heads, L, D] (any strides; undefined = zero), or in pieces. Per q/k row:
//   dy = rotate(d, -angle) rounded to the dtype,  g = dy * scale,  xhat = x * r
//   dx = r * (g - xhat * mean_D(g * xhat)),  dscale = sum over rows of dy * xhat
// and dv transposed back into the qkv layout.
std::vector<QkvSegmentGrads> qk_norm_rope_backward(const GradPieces& dq, const GradPieces& dk, const GradPieces& dv,
                                                   const std::vector<QkvSegment>& segs, int64_t heads,
                                                   const at::Tensor& cos, const at::Tensor& sin,
                                                   const std::vector<QkvSegmentNeeds>& needs);

// Plain ATen versions (any device): the unfused model's exact op sequence (rms_norm's CPU
// function, then rope_rotate_reference), what CPU runs use and the tests' reference.
std::array<at::Tensor, 3> qk_norm_rope_forward_reference(const std::vector<QkvSegment>& segs, int64_t heads,
                                                         const at::Tensor& cos, const at::Tensor& sin);
std::vector<QkvSegmentGrads> qk_norm_rope_backward_reference(const GradPieces& dq, const GradPieces& dk,
                                                             const GradPieces& dv, const std::vector<QkvSegment>& segs,
                                                             int64_t heads, const at::Tensor& cos,
                                                             const at::Tensor& sin,
                                                             const std::vector<QkvSegmentNeeds>& needs);

// Whether the CUDA kernels take these arguments: 1 to 3 segments of CUDA bf16/fp16/fp32 qkv of
// one dtype and batch size, contiguous last dim, D even, scales [D] of qkv's dtype or float32,
// cos/sin float32 [L, D/2] on the same device. The dispatchers use the reference otherwise.
bool qk_norm_rope_cuda_supported(const std::vector<QkvSegment>& segs, int64_t heads, const at::Tensor& cos,
                                 const at::Tensor& sin);

#ifdef FLUXTRAIN_WITH_CUDA
std::array<at::Tensor, 3> qk_norm_rope_forward_cuda(const std::vector<QkvSegment>& segs, int64_t heads,
                                                    const at::Tensor& cos, const at::Tensor& sin);
// dqkv only (the scale gradients, rarely wanted since the norms are frozen in LoRA training,
// are ATen reductions in the dispatcher). Entry i is undefined where need_dqkv[i] is false.
std::vector<at::Tensor> qk_norm_rope_backward_cuda(const GradPieces& dq, const GradPieces& dk, const GradPieces& dv,
                                                   const std::vector<QkvSegment>& segs, int64_t heads,
                                                   const at::Tensor& cos, const at::Tensor& sin,
                                                   const std::vector<bool>& need_dqkv);
#endif

}  // namespace fluxtrain::kernels
