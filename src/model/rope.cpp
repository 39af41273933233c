#include "model/rope.h"

#include <optional>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "kernels/rope.h"

namespace fluxtrain {

Rope rope_from_ids(const at::Tensor& ids, const std::vector<int64_t>& axes_dim, double theta,
                   at::ScalarType acc) {
  // Angles are formed in float64 (as BFL does) and stored in the accumulation dtype.
  at::Tensor pos = ids.to(at::kDouble);
  std::vector<at::Tensor> angles;
  for (size_t a = 0; a < axes_dim.size(); ++a) {
    const int64_t d = axes_dim[a];
    at::Tensor scale = at::arange(0, d, 2, pos.options()) / static_cast<double>(d);
    at::Tensor omega = 1.0 / at::pow(theta, scale);                       // [d/2]
    angles.push_back(pos.select(1, static_cast<int64_t>(a)).unsqueeze(1) * omega.unsqueeze(0));  // [L, d/2]
  }
  at::Tensor ang = at::cat(angles, 1);
  return {at::cos(ang).to(acc), at::sin(ang).to(acc)};
}

namespace {

// A rotation's backward is the rotation by the opposite angle. Written as a custom function,
// backward needs only cos/sin (shared by all blocks) instead of float32 copies of q and k per
// block, which plain autograd would keep alive.
struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return kernels::rope_rotate(x, cos, sin, /*inverse=*/false);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    return {kernels::rope_rotate(grads[0], saved[0], saved[1], /*inverse=*/true), at::Tensor(), at::Tensor()};
  }
};

// Head split + QK RMSNorm + RoPE of up to three streams (kernels/qk_norm_rope.h). The second
// and third streams' tensors are optional (Function::apply takes no undefined tensors; a nullopt
// input has no autograd edge, so the edges are: stream i's qkv, q_scale, k_scale at 3i..3i+2 for
// the streams present, then cos, sin). Saves the qkv inputs (the unfused graph keeps them too:
// its RMSNorm saves views of them) and the shared cos/sin, nothing per output.
// split > 0: the outputs are q of tokens [0, split), k and v of all tokens, then q, k and v of
// tokens [split, L), as views of the same memory; backward takes each output's gradient as a
// piece (kernels::GradPieces), so no full-size gradient is assembled from the slices.
struct QkNormRopeFunction : public torch::autograd::Function<QkNormRopeFunction> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& qkv0, const at::Tensor& qs0, const at::Tensor& ks0,
      const std::optional<at::Tensor>& qkv1, const std::optional<at::Tensor>& qs1,
      const std::optional<at::Tensor>& ks1, const std::optional<at::Tensor>& qkv2,
      const std::optional<at::Tensor>& qs2, const std::optional<at::Tensor>& ks2, const at::Tensor& cos,
      const at::Tensor& sin, int64_t heads, int64_t split) {
    std::vector<kernels::QkvSegment> segs{{qkv0, qs0, ks0}};
    torch::autograd::variable_list saved{cos, sin, qkv0, qs0, ks0};
    for (const auto* st : {&qkv1, &qkv2}) {
      if (!*st) continue;
      const bool second = st == &qkv1;
      segs.push_back({**st, second ? *qs1 : *qs2, second ? *ks1 : *ks2});
      saved.insert(saved.end(), {segs.back().qkv, segs.back().q_scale, segs.back().k_scale});
    }
    auto out = kernels::qk_norm_rope_forward(segs, heads, cos, sin);
    ctx->save_for_backward(saved);
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["split"] = split;
    ctx->set_materialize_grads(false);  // an unused output (e.g. q of a condition stream) gets no zeros
    if (split <= 0) return {out[0], out[1], out[2]};
    const int64_t rest = out[0].size(2) - split;
    return {out[0].narrow(2, 0, split), out[1],  out[2], out[0].narrow(2, split, rest), out[1].narrow(2, split, rest),
            out[2].narrow(2, split, rest)};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    const int64_t heads = ctx->saved_data["heads"].toInt(), split = ctx->saved_data["split"].toInt();
    std::vector<kernels::QkvSegment> segs;
    for (size_t i = 2; i + 2 < s.size(); i += 3) segs.push_back({s[i], s[i + 1], s[i + 2]});
    std::vector<kernels::QkvSegmentNeeds> needs;
    bool any = false;
    for (size_t i = 0; i < segs.size(); ++i) {
      needs.push_back({ctx->needs_input_grad(3 * i), ctx->needs_input_grad(3 * i + 1),
                       ctx->needs_input_grad(3 * i + 2)});
      any = any || needs.back().qkv || needs.back().q_scale || needs.back().k_scale;
    }
    torch::autograd::variable_list out(13);  // qkv, q_scale, k_scale of 3 streams, cos, sin, heads, split
    bool any_grad = false;
    for (const auto& g : grads) any_grad = any_grad || g.defined();
    if (!any || !any_grad) return out;
    std::vector<kernels::QkvSegmentGrads> g;
    if (split <= 0) {
      g = kernels::qk_norm_rope_backward(grads[0], grads[1], grads[2], segs, heads, s[0], s[1], needs);
    } else {
      g = kernels::qk_norm_rope_backward({grads[0], 0, grads[3], split}, {grads[1], 0, grads[4], split},
                                         {grads[2], 0, grads[5], split}, segs, heads, s[0], s[1], needs);
    }
    for (size_t i = 0; i < segs.size(); ++i) {
      out[3 * i] = g[i].qkv;
      out[3 * i + 1] = g[i].q_scale;
      out[3 * i + 2] = g[i].k_scale;
    }
    return out;
  }
};

torch::autograd::variable_list apply_qk_norm_rope(const std::vector<kernels::QkvSegment>& streams, int64_t heads,
                                                  const Rope& r, int64_t split) {
  TORCH_CHECK(!streams.empty() && streams.size() <= 3, "qk_norm_rope: one to three streams");
  std::optional<at::Tensor> opt[2][3];
  for (size_t i = 1; i < streams.size(); ++i) {
    opt[i - 1][0] = streams[i].qkv;
    opt[i - 1][1] = streams[i].q_scale;
    opt[i - 1][2] = streams[i].k_scale;
  }
  return QkNormRopeFunction::apply(streams[0].qkv, streams[0].q_scale, streams[0].k_scale, opt[0][0], opt[0][1],
                                   opt[0][2], opt[1][0], opt[1][1], opt[1][2], r.cos, r.sin, heads, split);
}

}  // namespace

std::array<at::Tensor, 3> qk_norm_rope(const std::vector<kernels::QkvSegment>& streams, int64_t heads, const Rope& r) {
  auto out = apply_qk_norm_rope(streams, heads, r, 0);
  return {out[0], out[1], out[2]};
}

SplitQkv qk_norm_rope_split(const std::vector<kernels::QkvSegment>& streams, int64_t heads, const Rope& r,
                            int64_t split) {
  int64_t L = 0;
  for (const auto& st : streams) L += st.qkv.size(1);
  TORCH_CHECK(split > 0 && split < L, "qk_norm_rope_split: the split ", split, " must fall inside the ", L, " tokens");
  auto out = apply_qk_norm_rope(streams, heads, r, split);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

at::Tensor apply_rope(const at::Tensor& x, const Rope& r) {
  return RopeFunction::apply(x, r.cos, r.sin);
}

at::Tensor apply_rope_reference(const at::Tensor& x, const Rope& r) {
  return kernels::rope_rotate_reference(x, r.cos, r.sin, /*inverse=*/false);  // plain ATen ops
}

Rope rope_cat(const std::vector<Rope>& parts) {
  std::vector<at::Tensor> c, s;
  for (const auto& p : parts) {
    c.push_back(p.cos);
    s.push_back(p.sin);
  }
  return {at::cat(c, 0), at::cat(s, 0)};
}

}  // namespace fluxtrain
