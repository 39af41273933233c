#include "model/rope.h"

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

}  // namespace

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
