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

// Head split + QK RMSNorm + RoPE of up to two streams (kernels/qk_norm_rope.h). The second
// stream's tensors are optional (Function::apply takes no undefined tensors; a nullopt input has
// no autograd edge, so the edges are: first stream 0..2, second stream 3..5 when present, then
// cos, sin). Saves the qkv inputs (the unfused graph keeps them too: its RMSNorm saves views of
// them) and the shared cos/sin, nothing per output.
struct QkNormRopeFunction : public torch::autograd::Function<QkNormRopeFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& qkv0,
                                                const at::Tensor& qs0, const at::Tensor& ks0,
                                                const std::optional<at::Tensor>& qkv1,
                                                const std::optional<at::Tensor>& qs1,
                                                const std::optional<at::Tensor>& ks1, const at::Tensor& cos,
                                                const at::Tensor& sin, int64_t heads) {
    std::vector<kernels::QkvSegment> segs{{qkv0, qs0, ks0}};
    if (qkv1) segs.push_back({*qkv1, *qs1, *ks1});
    auto out = kernels::qk_norm_rope_forward(segs, heads, cos, sin);
    if (qkv1)
      ctx->save_for_backward({cos, sin, qkv0, qs0, ks0, *qkv1, *qs1, *ks1});
    else
      ctx->save_for_backward({cos, sin, qkv0, qs0, ks0});
    ctx->saved_data["heads"] = heads;
    ctx->set_materialize_grads(false);  // an unused output (e.g. q of a condition stream) gets no zeros
    return {out[0], out[1], out[2]};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    const int64_t heads = ctx->saved_data["heads"].toInt();
    std::vector<kernels::QkvSegment> segs{{s[2], s[3], s[4]}};
    if (s.size() == 8) segs.push_back({s[5], s[6], s[7]});
    std::vector<kernels::QkvSegmentNeeds> needs;
    bool any = false;
    for (size_t i = 0; i < segs.size(); ++i) {
      needs.push_back({ctx->needs_input_grad(3 * i), ctx->needs_input_grad(3 * i + 1),
                       ctx->needs_input_grad(3 * i + 2)});
      any = any || needs.back().qkv || needs.back().q_scale || needs.back().k_scale;
    }
    torch::autograd::variable_list out(9);  // qkv, q_scale, k_scale of each stream, cos, sin, heads
    if (!any || (!grads[0].defined() && !grads[1].defined() && !grads[2].defined())) return out;
    auto g = kernels::qk_norm_rope_backward(grads[0], grads[1], grads[2], segs, heads, s[0], s[1], needs);
    for (size_t i = 0; i < segs.size(); ++i) {
      out[3 * i] = g[i].qkv;
      out[3 * i + 1] = g[i].q_scale;
      out[3 * i + 2] = g[i].k_scale;
    }
    return out;
  }
};

}  // namespace

std::array<at::Tensor, 3> qk_norm_rope(const std::vector<kernels::QkvSegment>& streams, int64_t heads, const Rope& r) {
  TORCH_CHECK(streams.size() == 1 || streams.size() == 2, "qk_norm_rope: one or two streams");
  std::optional<at::Tensor> qkv1, qs1, ks1;
  if (streams.size() == 2) qkv1 = streams[1].qkv, qs1 = streams[1].q_scale, ks1 = streams[1].k_scale;
  auto out = QkNormRopeFunction::apply(streams[0].qkv, streams[0].q_scale, streams[0].k_scale, qkv1, qs1, ks1, r.cos,
                                       r.sin, heads);
  return {out[0], out[1], out[2]};
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
