// FLUX's 3-axis rotary position embedding. Each axis a with d_a dims rotates d_a/2 adjacent
// pairs (x[2j], x[2j+1]) by angle pos_a * theta^(-2j/d_a); axes are concatenated in order.
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>

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

}  // namespace fluxtrain
