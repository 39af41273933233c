// FLUX's 3-axis rotary position embedding. Each axis a with d_a dims rotates d_a/2 adjacent
// pairs (x[2j], x[2j+1]) by angle pos_a * theta^(-2j/d_a); axes are concatenated in order.
#pragma once
#include <array>
#include <vector>

#include <ATen/core/Tensor.h>

#include "kernels/qk_norm_rope.h"

namespace fluxtrain {

struct Rope {
  at::Tensor cos, sin;  // [L, head_dim/2] each, float32 (float64 for float64 models)
  bool defined() const { return cos.defined(); }
};

// ids: [L, n_axes] positions (may be fractional).
Rope rope_from_ids(const at::Tensor& ids, const std::vector<int64_t>& axes_dim, double theta,
                   at::ScalarType acc);
// x: [B, heads, L, D]; returns x rotated, in x's dtype (math in cos' dtype).
at::Tensor apply_rope(const at::Tensor& x, const Rope& r);
// The same rotation through plain autograd ops (tests compare the two, gradients included).
at::Tensor apply_rope_reference(const at::Tensor& x, const Rope& r);
Rope rope_cat(const std::vector<Rope>& parts);  // along L

// The attention prologue of one or two qkv streams fused (kernels/qk_norm_rope.h): head split,
// QK RMSNorm with each stream's scales, RoPE, as an autograd function with a hand-written
// backward (only the gradients autograd needs). Returns {q, k, v}, each a contiguous
// [B, heads, L, D] with L = the streams' tokens in order (r covers exactly those). On CUDA the
// fused kernels; elsewhere the reference (the unfused model's op sequence, same values).
std::array<at::Tensor, 3> qk_norm_rope(const std::vector<kernels::QkvSegment>& streams, int64_t heads, const Rope& r);

}  // namespace fluxtrain
