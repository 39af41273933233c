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

// The attention prologue of one to three qkv streams fused (kernels/qk_norm_rope.h): head split,
// QK RMSNorm with each stream's scales, RoPE, as an autograd function with a hand-written
// backward (only the gradients autograd needs). Returns {q, k, v}, each [B, heads, L, D] with
// L = the streams' tokens in order (r covers exactly those). On CUDA the fused kernels (outputs
// are views of token-major memory); elsewhere the reference (the unfused model's op sequence,
// same values, contiguous).
std::array<at::Tensor, 3> qk_norm_rope(const std::vector<kernels::QkvSegment>& streams, int64_t heads, const Rope& r);

// The same prologue over main tokens [0, split) followed by condition tokens [split, L), its
// outputs cut for split_attention (blocks.h): the main queries attend over the keys and values of
// all tokens, the condition queries over the condition's own. All six are views of the three
// outputs, and each one's gradient goes to the kernel as a piece: no concatenation of keys and
// values forward, no full-size gradient assembled from slices backward.
struct SplitQkv {
  at::Tensor q_main, k_all, v_all;     // [B, heads, split, D]; [B, heads, L, D] twice
  at::Tensor q_cond, k_cond, v_cond;  // [B, heads, L - split, D]
};
SplitQkv qk_norm_rope_split(const std::vector<kernels::QkvSegment>& streams, int64_t heads, const Rope& r,
                            int64_t split);

}  // namespace fluxtrain
