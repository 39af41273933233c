#include "kernels/qk_norm_rope.h"

#include <ATen/ATen.h>

#include "kernels/rope.h"

namespace fluxtrain::kernels {
namespace {

constexpr double kEps = 1e-6;

at::ScalarType acc_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

int64_t head_dim(const at::Tensor& qkv, int64_t heads) { return qkv.size(2) / (3 * heads); }

// Part t (0 q, 1 k, 2 v) of a segment as a [B, heads, L_i, D] view (split_heads' layout).
at::Tensor part(const at::Tensor& qkv, int64_t heads, int64_t t) {
  const int64_t B = qkv.size(0), L = qkv.size(1), D = head_dim(qkv, heads);
  return qkv.view({B, L, 3, heads, D}).select(2, t).permute({0, 2, 1, 3});
}

// rms_norm's CPU function (model/layers.cpp) followed by split_heads' cast, op for op.
at::Tensor rms_forward(const at::Tensor& x, const at::Tensor& scale) {
  const auto acc = acc_of(x);
  at::Tensor xf = x.to(acc);
  at::Tensor r = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + kEps);
  return ((xf * r).to(x.scalar_type()) * scale).to(x.scalar_type());
}

at::Tensor cat_tokens(const std::vector<at::Tensor>& parts) { return parts.size() == 1 ? parts[0] : at::cat(parts, 2); }

void check_segments(const std::vector<QkvSegment>& segs, int64_t heads) {
  TORCH_CHECK(!segs.empty() && heads > 0, "qk_norm_rope: no segments");
  for (const auto& s : segs) {
    TORCH_CHECK(s.qkv.defined() && s.qkv.dim() == 3 && s.qkv.size(2) % (3 * heads) == 0 &&
                    s.qkv.size(0) == segs[0].qkv.size(0) && s.qkv.size(2) == segs[0].qkv.size(2),
                "qk_norm_rope: qkv segments must be [B, L_i, 3*heads*D] with one B and D");
  }
}

}  // namespace

std::array<at::Tensor, 3> qk_norm_rope_forward_reference(const std::vector<QkvSegment>& segs, int64_t heads,
                                                         const at::Tensor& cos, const at::Tensor& sin) {
  check_segments(segs, heads);
  std::vector<at::Tensor> qs, ks, vs;
  for (const auto& s : segs) {
    qs.push_back(rms_forward(part(s.qkv, heads, 0), s.q_scale));
    ks.push_back(rms_forward(part(s.qkv, heads, 1), s.k_scale));
    vs.push_back(part(s.qkv, heads, 2));
  }
  return {rope_rotate_reference(cat_tokens(qs), cos, sin, /*inverse=*/false),
          rope_rotate_reference(cat_tokens(ks), cos, sin, /*inverse=*/false), cat_tokens(vs).contiguous()};
}

namespace {

// The pieces as one [B, heads, L, D] gradient (undefined when there are none): each piece added
// into its tokens of zeros, in the pieces' dtype, so that a token covered twice gets the rounded
// sum autograd would form.
at::Tensor whole_grad(const GradPieces& g, const std::vector<QkvSegment>& segs, int64_t heads) {
  if (!g.defined()) return {};
  const at::Tensor& any = g.a.defined() ? g.a : g.b;
  int64_t L = 0;
  for (const auto& s : segs) L += s.qkv.size(1);
  if (g.a.defined() && !g.b.defined() && g.a_first == 0 && g.a.size(2) == L) return g.a;
  TORCH_CHECK(!g.a.defined() || !g.b.defined() || g.a.scalar_type() == g.b.scalar_type(),
              "qk_norm_rope_backward: gradient pieces of one dtype");
  at::Tensor out = at::zeros({segs[0].qkv.size(0), heads, L, any.size(3)}, any.options());
  for (const auto& [t, first] : {std::pair<at::Tensor, int64_t>{g.a, g.a_first}, {g.b, g.b_first}}) {
    if (!t.defined()) continue;
    TORCH_CHECK(t.dim() == 4 && first >= 0 && first + t.size(2) <= L, "qk_norm_rope_backward: a gradient piece ",
                t.sizes(), " from token ", first, " outside the ", L, " tokens");
    out.narrow(2, first, t.size(2)).add_(t);
  }
  return out;
}

}  // namespace

std::vector<QkvSegmentGrads> qk_norm_rope_backward_reference(const GradPieces& dq_p, const GradPieces& dk_p,
                                                             const GradPieces& dv_p,
                                                             const std::vector<QkvSegment>& segs, int64_t heads,
                                                             const at::Tensor& cos, const at::Tensor& sin,
                                                             const std::vector<QkvSegmentNeeds>& needs) {
  check_segments(segs, heads);
  const at::Tensor dq = whole_grad(dq_p, segs, heads), dk = whole_grad(dk_p, segs, heads),
                   dv = whole_grad(dv_p, segs, heads);
  TORCH_CHECK(needs.size() == segs.size(), "qk_norm_rope_backward: one needs entry per segment");
  // The rotation's backward, rounded to the dtype as RopeFunction's backward does.
  const at::Tensor dyq = dq.defined() ? rope_rotate_reference(dq, cos, sin, /*inverse=*/true) : at::Tensor();
  const at::Tensor dyk = dk.defined() ? rope_rotate_reference(dk, cos, sin, /*inverse=*/true) : at::Tensor();
  std::vector<QkvSegmentGrads> out(segs.size());
  int64_t off = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    const QkvSegment& s = segs[i];
    const int64_t B = s.qkv.size(0), Li = s.qkv.size(1), D = head_dim(s.qkv, heads);
    const auto dt = s.qkv.scalar_type();
    const auto acc = acc_of(s.qkv);
    // RmsNormFunction's backward (model/layers.cpp) for part t.
    auto norm_backward = [&](const at::Tensor& dy_all, int64_t t, const at::Tensor& scale, bool need_dx,
                             bool need_ds, at::Tensor* dx, at::Tensor* ds) {
      if (!dy_all.defined()) {
        if (need_dx) *dx = at::zeros({B, heads, Li, D}, s.qkv.options());
        if (need_ds) *ds = at::zeros_like(scale);
        return;
      }
      at::Tensor xf = part(s.qkv, heads, t).to(acc);
      at::Tensor r = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + kEps);
      at::Tensor xhat = xf * r;
      at::Tensor dy = dy_all.narrow(2, off, Li).to(acc);
      if (need_dx) {
        at::Tensor g = dy * scale.to(acc);
        *dx = (r * (g - xhat * (g * xhat).mean(-1, true))).to(dt);
      }
      if (need_ds) *ds = (dy * xhat).reshape({-1, D}).sum(0).view(scale.sizes()).to(scale.scalar_type());
    };
    at::Tensor dxq, dxk;
    norm_backward(dyq, 0, s.q_scale, needs[i].qkv, needs[i].q_scale, &dxq, &out[i].q_scale);
    norm_backward(dyk, 1, s.k_scale, needs[i].qkv, needs[i].k_scale, &dxk, &out[i].k_scale);
    if (needs[i].qkv) {
      at::Tensor dvi = dv.defined() ? dv.narrow(2, off, Li).to(dt) : at::zeros({B, heads, Li, D}, s.qkv.options());
      // [3, B, heads, L_i, D] -> [B, L_i, 3, heads, D]
      out[i].qkv = at::stack({dxq, dxk, dvi}, 0).permute({1, 3, 0, 2, 4}).contiguous().view({B, Li, 3 * heads * D});
    }
    off += Li;
  }
  return out;
}

bool qk_norm_rope_cuda_supported(const std::vector<QkvSegment>& segs, int64_t heads, const at::Tensor& cos,
                                 const at::Tensor& sin) {
#ifdef FLUXTRAIN_WITH_CUDA
  if (segs.empty() || segs.size() > 3 || heads <= 0 || !segs[0].qkv.defined()) return false;
  const at::Tensor& q0 = segs[0].qkv;
  const auto dt = q0.scalar_type();
  if (!q0.is_cuda() || !(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat)) return false;
  if (q0.dim() != 3 || q0.size(2) == 0 || q0.size(2) % (3 * heads) != 0) return false;
  const int64_t D = head_dim(q0, heads);
  if (D % 2 != 0) return false;
  int64_t L = 0;
  for (const auto& s : segs) {
    const at::Tensor& x = s.qkv;
    if (!x.defined() || x.device() != q0.device() || x.scalar_type() != dt || x.dim() != 3 ||
        x.size(0) != q0.size(0) || x.size(2) != q0.size(2) || x.stride(2) != 1)
      return false;
    for (const at::Tensor* sc : {&s.q_scale, &s.k_scale}) {
      if (!sc->defined() || sc->device() != q0.device() || sc->numel() != D ||
          !(sc->scalar_type() == dt || sc->scalar_type() == at::kFloat))
        return false;
    }
    L += x.size(1);
  }
  for (const at::Tensor* t : {&cos, &sin}) {
    if (!t->defined() || t->device() != q0.device() || t->scalar_type() != at::kFloat || t->dim() != 2 ||
        t->size(0) != L || t->size(1) != D / 2)
      return false;
  }
  return true;
#else
  (void)segs, (void)heads, (void)cos, (void)sin;
  return false;
#endif
}

std::array<at::Tensor, 3> qk_norm_rope_forward(const std::vector<QkvSegment>& segs, int64_t heads,
                                               const at::Tensor& cos, const at::Tensor& sin) {
#ifdef FLUXTRAIN_WITH_CUDA
  if (qk_norm_rope_cuda_supported(segs, heads, cos, sin)) return qk_norm_rope_forward_cuda(segs, heads, cos, sin);
#endif
  return qk_norm_rope_forward_reference(segs, heads, cos, sin);
}

std::vector<QkvSegmentGrads> qk_norm_rope_backward(const GradPieces& dq, const GradPieces& dk, const GradPieces& dv,
                                                   const std::vector<QkvSegment>& segs, int64_t heads,
                                                   const at::Tensor& cos, const at::Tensor& sin,
                                                   const std::vector<QkvSegmentNeeds>& needs) {
#ifdef FLUXTRAIN_WITH_CUDA
  bool grads_ok = true;
  for (const GradPieces* g : {&dq, &dk, &dv})
    for (const at::Tensor* t : {&g->a, &g->b})
      grads_ok = grads_ok && (!t->defined() || (t->is_cuda() && t->dim() == 4));
  if (grads_ok && needs.size() == segs.size() && qk_norm_rope_cuda_supported(segs, heads, cos, sin)) {
    std::vector<bool> need_dqkv;
    std::vector<QkvSegmentNeeds> scale_needs;
    bool any_scale = false;
    for (const auto& n : needs) {
      need_dqkv.push_back(n.qkv);
      scale_needs.push_back({/*qkv=*/false, n.q_scale, n.k_scale});
      any_scale = any_scale || n.q_scale || n.k_scale;
    }
    // Scale gradients (frozen norms in LoRA training: rarely wanted) through the ATen path.
    std::vector<QkvSegmentGrads> out =
        any_scale ? qk_norm_rope_backward_reference(dq, dk, dv, segs, heads, cos, sin, scale_needs)
                  : std::vector<QkvSegmentGrads>(segs.size());
    std::vector<at::Tensor> dqkv = qk_norm_rope_backward_cuda(dq, dk, dv, segs, heads, cos, sin, need_dqkv);
    for (size_t i = 0; i < segs.size(); ++i) out[i].qkv = dqkv[i];
    return out;
  }
#endif
  return qk_norm_rope_backward_reference(dq, dk, dv, segs, heads, cos, sin, needs);
}

}  // namespace fluxtrain::kernels
