#include "model/gelu_linear.h"

#include <cstdlib>

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
// With adapters: dh_i = s_i dy_i U_i (its columns of dh), dU_i = s_i dy_i^T h_i, dD = dh^T
// [xs..., GELU(pre)] (one product per input block), and each input block's gradient gets dh D_j
// added by an accumulating GEMM (beta = 1); pre's then goes through a dense GELU backward. (The
// DGELU epilogue over the K-concatenated [dy | dh] [w_j ; D_j] measured slower: the two
// concatenations took 5.7 ms per step at 1024 px and cuBLASLt's epilogue kernel runs at about
// 610 TFLOP/s against 700 for the plain product; docs/benchmarks.md, session 16.)
struct GeluLinearBackward : public torch::autograd::Node {
  at::Tensor w, w_scale;
  torch::autograd::SavedVariable pre;
  std::vector<int64_t> col0, width;
  std::vector<std::vector<int64_t>> sizes;  // of each x, then of pre
  // Adapters (none when ranks is empty): D [R, in] the stacked downs and U[i] the ups, in the
  // activations' dtype; h [rows, R] the down products; act = GELU(pre) and the xs, kept only when a
  // down needs its gradient.
  at::Tensor D, h, act;
  std::vector<at::Tensor> U;
  std::vector<torch::autograd::SavedVariable> xs;
  std::vector<int64_t> ranks, offsets;
  std::vector<double> scales;
  std::vector<at::ScalarType> down_dtypes, up_dtypes;

  std::string name() const override { return "GeluLinearBackward"; }
  void release_variables() override {
    w.reset();
    w_scale.reset();
    pre.reset_data();
    D.reset();
    h.reset();
    act.reset();
    U.clear();
    for (auto& x : xs) x.reset_data();
  }

  // The adapters' gradients into out (downs at n_in + i, ups at n_in + k + i); returns dh (undefined
  // when no input needs a gradient).
  at::Tensor adapter_grads(const at::Tensor& dy, variable_list& out) {
    const size_t n_in = sizes.size(), k = ranks.size();
    bool need_in = false, need_down = false;
    for (size_t i = 0; i < n_in; ++i) need_in = need_in || should_compute_output(i);
    for (size_t i = 0; i < k; ++i) need_down = need_down || should_compute_output(n_in + i);
    const at::Tensor dh = need_in || need_down ? adapters_dh(dy, U, offsets, scales) : at::Tensor();
    int64_t r0 = 0;
    for (size_t i = 0; i < k; ++i) {
      if (should_compute_output(n_in + k + i))
        out[n_in + k + i] = adapter_up_grad(dy, h, r0, U[i], offsets[i], scales[i], up_dtypes[i]);
      r0 += ranks[i];
    }
    if (need_down) {
      // One product per input block, joined along the columns: dD = dh^T [xs..., act].
      bool one_dtype = true;
      for (size_t i = 1; i < k; ++i) one_dtype = one_dtype && down_dtypes[i] == down_dtypes[0];
      std::vector<at::Tensor> parts;
      for (size_t j = 0; j < n_in; ++j) {
        const at::Tensor x = j + 1 == n_in ? act : xs[j].unpack(shared_from_this()).reshape({-1, width[j]});
        parts.push_back(one_dtype ? matmul_to(dh.t(), x, down_dtypes[0]) : at::mm(dh.t(), x));
      }
      const at::Tensor dD = parts.size() == 1 ? parts[0] : at::cat(parts, 1);
      r0 = 0;
      for (size_t i = 0; i < k; ++i) {
        if (should_compute_output(n_in + i)) out[n_in + i] = dD.narrow(0, r0, ranks[i]).to(down_dtypes[i]);
        r0 += ranks[i];
      }
    }
    return need_in ? dh : at::Tensor();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(sizes.size() + 2 * ranks.size());
    if (!grads[0].defined()) return out;
    const at::Tensor dy = grads[0].reshape({-1, w.size(0)});
    const size_t last = sizes.size() - 1;
    const at::Tensor dh = ranks.empty() ? at::Tensor() : adapter_grads(dy, out);
    auto Dj = [&](size_t j) { return D.narrow(1, col0[j], width[j]); };
    if (w.scalar_type() == at::kFloat8_e4m3fn) {
      std::vector<at::Tensor> dz = kernels::fp8_linear_input_grad_blocks(dy, w, w_scale, width);
      for (size_t i = 0; i <= last; ++i)
        if (dh.defined() && should_compute_output(i)) dz[i].addmm_(dh, Dj(i));
      for (size_t i = 0; i < last; ++i)
        if (should_compute_output(i)) out[i] = dz[i].view(sizes[i]);
      if (should_compute_output(last))
        out[last] = at::gelu_backward(dz[last], pre.unpack(shared_from_this()).reshape({-1, width[last]}), "tanh")
                        .view(sizes[last]);
      return out;
    }
    for (size_t i = 0; i < last; ++i) {
      if (!should_compute_output(i)) continue;
      at::Tensor dx = at::mm(dy, w.narrow(1, col0[i], width[i]));
      if (dh.defined()) dx.addmm_(dh, Dj(i));
      out[i] = dx.view(sizes[i]);
    }
    if (should_compute_output(last)) {
      const at::Tensor p = pre.unpack(shared_from_this()).reshape({-1, width[last]});
      const at::Tensor wl = w.narrow(1, col0[last], width[last]);
      at::Tensor dpre;
      if (dh.defined()) {
        at::Tensor dact = at::mm(dy, wl);
        dact.addmm_(dh, Dj(last));
        dpre = at::gelu_backward(dact, p, "tanh");
      } else {
        dpre = kernels::matmul_dgelu(dy, wl, p);
      }
      out[last] = dpre.view(sizes[last]);
    }
    return out;
  }
};

void delete_node(torch::autograd::Node* n) { delete n; }

// The forward values, as the unfused ops compute them: GELU of pre, the first input's product
// with the bias, then each further product accumulated by the same GEMM (addmm). With an fp8
// weight: one fp8 product of the concatenation, quantised as one matrix, GELU applied by the
// quantiser as it reads pre (kernels::fp8_linear_forward_blocks; the same bits as at::gelu).
// act: GELU(pre) where it was computed (the 16-bit path), for the adapters.
at::Tensor forward_values(const std::vector<at::Tensor>& xs, const at::Tensor& pre, const at::Tensor& w,
                          const at::Tensor& b, const at::Tensor& w_scale, at::Tensor* act) {
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
  *act = ins.back();
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

void check_adapters(const InputAdapters& a, int64_t in, int64_t out) {
  const size_t k = a.downs.size();
  TORCH_CHECK(a.ups.size() == k && a.offsets.size() == k && a.scales.size() == k,
              "gelu_linear: one down, up, offset and scale per adapter");
  for (size_t i = 0; i < k; ++i)
    TORCH_CHECK(a.downs[i].dim() == 2 && a.downs[i].size(1) == in && a.ups[i].dim() == 2 &&
                    a.ups[i].size(1) == a.downs[i].size(0) && a.offsets[i] >= 0 &&
                    a.offsets[i] + a.ups[i].size(0) <= out,
                "gelu_linear: adapter ", i, " does not fit a ", in, " -> ", out, " linear");
}

}  // namespace

at::Tensor gelu_linear(const std::vector<at::Tensor>& xs, const at::Tensor& pre, const at::Tensor& w,
                       const at::Tensor& b, bool compute_output, const at::Tensor& w_scale,
                       const InputAdapters& adapters) {
  int64_t in = pre.size(-1);
  for (const auto& x : xs) in += x.size(-1);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == in, "gelu_linear: inputs do not match the weight");
  check_adapters(adapters, in, w.size(0));
  const size_t k = adapters.downs.size();
  bool any = pre.requires_grad();
  for (const auto& x : xs) any = any || x.requires_grad();
  bool down_grad = false;
  for (const auto& d : adapters.downs) down_grad = down_grad || d.requires_grad();
  for (const auto& u : adapters.ups) any = any || u.requires_grad();
  any = any || down_grad;
  const bool track = at::GradMode::is_enabled() && any;
  const auto dt = pre.scalar_type();
  at::Tensor y, act, D, h;
  std::vector<at::Tensor> U;
  {
    at::NoGradGuard ng;
    if (compute_output) {
      y = forward_values(xs, pre, w, b, w_scale, &act);
    } else {
      auto sizes = pre.sizes().vec();
      sizes.back() = w.size(0);
      y = at::empty(sizes, pre.options());
      note_linear_skipped();
    }
    if (k > 0) {
      // h = [xs..., act] D^T, one product per input block accumulated into the first; then each
      // adapter's up product added into its columns of y (beta = 1).
      if (!act.defined()) act = at::gelu(pre, "tanh");
      D = (k == 1 ? adapters.downs[0] : at::cat(adapters.downs, 0)).to(dt);
      std::vector<at::Tensor> ins(xs);
      ins.push_back(act);
      int64_t c = 0;
      for (const auto& x : ins) {
        const at::Tensor x2 = x.reshape({-1, x.size(-1)}), Dc = D.narrow(1, c, x.size(-1));
        if (!h.defined())
          h = at::mm(x2, Dc.t());
        else
          h.addmm_(x2, Dc.t());
        c += x.size(-1);
      }
      const at::Tensor y2 = y.view({-1, w.size(0)});
      int64_t r0 = 0;
      for (size_t i = 0; i < k; ++i) {
        U.push_back(adapters.ups[i].to(dt));
        const int64_t r = adapters.downs[i].size(0);
        if (compute_output)
          y2.narrow(1, adapters.offsets[i], U[i].size(0)).addmm_(h.narrow(1, r0, r), U[i].t(), 1.0, adapters.scales[i]);
        r0 += r;
      }
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
  if (k > 0) {
    node->D = D;
    node->h = h;
    node->U = U;
    if (down_grad) {
      node->act = act.reshape({-1, act.size(-1)});
      for (const auto& x : xs) node->xs.emplace_back(x, false);
    }
    node->offsets = adapters.offsets;
    node->scales = adapters.scales;
    for (size_t i = 0; i < k; ++i) {
      node->ranks.push_back(adapters.downs[i].size(0));
      node->down_dtypes.push_back(adapters.downs[i].scalar_type());
      node->up_dtypes.push_back(adapters.ups[i].scalar_type());
    }
    ins.insert(ins.end(), adapters.downs.begin(), adapters.downs.end());
    ins.insert(ins.end(), adapters.ups.begin(), adapters.ups.end());
  }
  node->set_next_edges(torch::autograd::collect_next_edges(ins));
  torch::autograd::set_history(y, node);
  return y;
}

namespace {

// dz = dy w_down per input block (the last: GELU's output); dx = gelu_backward(dz_last, pre) w_up
// with GELU's backward taken by the quantiser; the other blocks' gradients as they come.
struct Fp8GeluMlpBackward : public torch::autograd::Node {
  at::Tensor w_up, ws_up, w_down, ws_down, pre;
  std::vector<int64_t> width;               // of each x in xs, then of pre
  std::vector<std::vector<int64_t>> sizes;  // of each x in xs, then of x
  std::string name() const override { return "Fp8GeluMlpBackward"; }
  void release_variables() override {
    w_up.reset();
    ws_up.reset();
    w_down.reset();
    ws_down.reset();
    pre.reset();
  }
  variable_list apply(variable_list&& grads) override {
    variable_list out(sizes.size());
    if (!grads[0].defined()) return out;
    const at::Tensor dy = grads[0].reshape({-1, w_down.size(0)});
    const std::vector<at::Tensor> dz = kernels::fp8_linear_input_grad_blocks(dy, w_down, ws_down, width);
    const size_t last = sizes.size() - 1;
    for (size_t i = 0; i < last; ++i)
      if (should_compute_output(i)) out[i] = dz[i].view(sizes[i]);
    if (should_compute_output(last))
      out[last] = kernels::fp8_linear_input_grad_through_gelu(dz[last], pre, w_up, ws_up).view(sizes[last]);
    return out;
  }
};

}  // namespace

bool fp8_gelu_mlp_enabled() {
  static const bool enabled = [] {
    const char* e = std::getenv("FLUXTRAIN_FP8_MLP_NODE");
    return !(e && e[0] == '0');
  }();
  return enabled;
}

at::Tensor fp8_gelu_mlp(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& b_up, const at::Tensor& ws_up,
                        const std::vector<at::Tensor>& xs, const at::Tensor& w_down, const at::Tensor& b_down,
                        const at::Tensor& ws_down, bool compute_output) {
  TORCH_CHECK(w_up.scalar_type() == at::kFloat8_e4m3fn && w_down.scalar_type() == at::kFloat8_e4m3fn &&
                  ws_up.defined() && ws_down.defined(),
              "fp8_gelu_mlp: both weights in the fp8 stored form (e4m3 codes and their scales)");
  int64_t in = w_up.size(0);
  for (const auto& t : xs) in += t.size(-1);
  TORCH_CHECK(x.size(-1) == w_up.size(1) && w_down.size(1) == in, "fp8_gelu_mlp: inputs do not match the weights");
  bool any = x.requires_grad();
  for (const auto& t : xs) any = any || t.requires_grad();
  const bool track = at::GradMode::is_enabled() && any;
  at::Tensor pre, y;
  {
    at::NoGradGuard ng;
    pre = kernels::fp8_linear_forward(x.reshape({-1, x.size(-1)}), w_up, ws_up, b_up);
    auto sizes = x.sizes().vec();
    sizes.back() = w_down.size(0);
    if (compute_output) {
      std::vector<at::Tensor> rows;
      for (const auto& t : xs) rows.push_back(t.reshape({-1, t.size(-1)}));
      rows.push_back(pre);
      y = kernels::fp8_linear_forward_blocks(rows, w_down, ws_down, b_down, kernels::Fp8Path::Auto, /*gelu_last=*/true)
              .view(sizes);
    } else {
      y = at::empty(sizes, x.options());
      note_linear_skipped();
    }
  }
  if (!track) return y;
  std::shared_ptr<Fp8GeluMlpBackward> node(new Fp8GeluMlpBackward(), delete_node);
  node->w_up = w_up.detach();
  node->ws_up = ws_up.detach();
  node->w_down = w_down.detach();
  node->ws_down = ws_down.detach();
  node->pre = pre;
  std::vector<at::Tensor> ins(xs);
  ins.push_back(x);
  for (const auto& t : xs) {
    node->width.push_back(t.size(-1));
    node->sizes.push_back(t.sizes().vec());
  }
  node->width.push_back(w_up.size(0));
  node->sizes.push_back(x.sizes().vec());
  node->set_next_edges(torch::autograd::collect_next_edges(ins));
  torch::autograd::set_history(y, node);
  return y;
}

}  // namespace fluxtrain
