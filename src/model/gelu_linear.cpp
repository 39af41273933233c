#include "model/gelu_linear.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include "kernels/fp8_matmul.h"
#include "kernels/matmul_dgelu.h"
#include "model/recompute.h"

namespace fluxtrain {
namespace {

using torch::autograd::variable_list;

// dx_i = dy w[:, columns of x_i]; dpre = (dy w[:, pre's columns]) * gelu_tanh'(pre).
// With an fp8 weight (w_scale defined): scaled fp8 products of one quantised dy give each input's
// gradient (kernels::fp8_linear_input_grad_blocks: dense blocks, so that GELU's backward, applied
// after them since no fp8 GEMM has that epilogue, runs vectorised: on a column view of one
// product it took 0.24 ms per single block at 512/1024/128 against 0.04 dense).
struct GeluLinearBackward : public torch::autograd::Node {
  at::Tensor w, w_scale;
  torch::autograd::SavedVariable pre;
  std::vector<int64_t> col0, width;
  std::vector<std::vector<int64_t>> sizes;  // of each x, then of pre

  std::string name() const override { return "GeluLinearBackward"; }
  void release_variables() override {
    w.reset();
    w_scale.reset();
    pre.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(sizes.size());
    if (!grads[0].defined()) return out;
    const at::Tensor dy = grads[0].reshape({-1, w.size(0)});
    const size_t last = sizes.size() - 1;
    if (w.scalar_type() == at::kFloat8_e4m3fn) {
      const std::vector<at::Tensor> dz = kernels::fp8_linear_input_grad_blocks(dy, w, w_scale, width);
      for (size_t i = 0; i < last; ++i)
        if (should_compute_output(i)) out[i] = dz[i].view(sizes[i]);
      if (should_compute_output(last))
        out[last] = at::gelu_backward(dz[last], pre.unpack(shared_from_this()).reshape({-1, width[last]}), "tanh")
                        .view(sizes[last]);
      return out;
    }
    for (size_t i = 0; i < last; ++i)
      if (should_compute_output(i)) out[i] = at::mm(dy, w.narrow(1, col0[i], width[i])).view(sizes[i]);
    if (should_compute_output(last)) {
      const at::Tensor p = pre.unpack(shared_from_this());
      out[last] = kernels::matmul_dgelu(dy, w.narrow(1, col0[last], width[last]), p.reshape({-1, width[last]}))
                      .view(sizes[last]);
    }
    return out;
  }
};

void delete_node(torch::autograd::Node* n) { delete n; }

// The forward values, as the unfused ops compute them: GELU of pre, the first input's product
// with the bias, then each further product accumulated by the same GEMM (addmm). With an fp8
// weight: one fp8 product of the concatenation, quantised as one matrix, GELU applied by the
// quantiser as it reads pre (kernels::fp8_linear_forward_blocks; the same bits as at::gelu).
at::Tensor forward_values(const std::vector<at::Tensor>& xs, const at::Tensor& pre, const at::Tensor& w,
                          const at::Tensor& b, const at::Tensor& w_scale) {
  if (w.scalar_type() == at::kFloat8_e4m3fn) {
    std::vector<at::Tensor> rows;
    for (const auto& x : xs) rows.push_back(x.reshape({-1, x.size(-1)}));
    rows.push_back(pre.reshape({-1, pre.size(-1)}));
    auto sizes = pre.sizes().vec();
    sizes.back() = w.size(0);
    return kernels::fp8_linear_forward_blocks(rows, w, w_scale, b, kernels::Fp8Path::Auto, /*gelu_last=*/true)
        .view(sizes);
  }
  std::vector<at::Tensor> ins(xs);
  ins.push_back(at::gelu(pre, "tanh"));
  at::Tensor y;
  int64_t c = 0;
  for (const auto& x : ins) {
    const at::Tensor wc = w.narrow(1, c, x.size(-1));
    if (!y.defined()) {
      y = at::linear(x, wc, b);
    } else {
      auto sz = y.sizes().vec();
      y = at::addmm(y.reshape({-1, sz.back()}), x.reshape({-1, x.size(-1)}), wc.t()).view(sz);
    }
    c += x.size(-1);
  }
  return y;
}

}  // namespace

at::Tensor gelu_linear(const std::vector<at::Tensor>& xs, const at::Tensor& pre, const at::Tensor& w,
                       const at::Tensor& b, bool compute_output, const at::Tensor& w_scale) {
  int64_t in = pre.size(-1);
  for (const auto& x : xs) in += x.size(-1);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == in, "gelu_linear: inputs do not match the weight");
  bool any = pre.requires_grad();
  for (const auto& x : xs) any = any || x.requires_grad();
  const bool track = at::GradMode::is_enabled() && any;
  at::Tensor y;
  {
    at::NoGradGuard ng;
    if (compute_output) {
      y = forward_values(xs, pre, w, b, w_scale);
    } else {
      auto sizes = pre.sizes().vec();
      sizes.back() = w.size(0);
      y = at::empty(sizes, pre.options());
      note_linear_skipped();
    }
  }
  if (!track) return y;
  std::shared_ptr<GeluLinearBackward> node(new GeluLinearBackward(), delete_node);
  node->w = w.detach();
  if (w_scale.defined()) node->w_scale = w_scale.detach();
  node->pre = torch::autograd::SavedVariable(pre, false);
  int64_t c = 0;
  std::vector<at::Tensor> ins(xs);
  ins.push_back(pre);
  for (const auto& x : ins) {
    node->col0.push_back(c);
    node->width.push_back(x.size(-1));
    node->sizes.push_back(x.sizes().vec());
    c += x.size(-1);
  }
  node->set_next_edges(torch::autograd::collect_next_edges(ins));
  torch::autograd::set_history(y, node);
  return y;
}

}  // namespace fluxtrain
