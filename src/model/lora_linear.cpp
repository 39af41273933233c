#include "model/lora_linear.h"

#include <optional>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "kernels/fp8_matmul.h"

namespace fluxtrain {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Forward: h = x D^T with the adapters' downs stacked (one GEMM), y = x w^T + b, then each up
// product added into its rows of y by an in-place addmm (beta = 1). Backward: dh_i = s_i dy_i U_i
// written into its columns of dh, dU_i = s_i dy_i^T h_i, dD = dh^T x (one GEMM), and
// dx = dy w + dh D with the second product accumulated into the first (beta = 1).
// Autograd on the plain ops instead materialises cat(deltas) and y + cat forward and adds the two
// input gradients backward: three passes over activation-sized tensors per adapted linear.
// An e4m3 w (the stored form, --fp8_matmul) takes the base products through kernels/fp8_matmul.h
// with its scales w_scale; the adapters' products stay in x's dtype.
// Adapter rows [row0, row1) of the flattened x (all rows when row1 < 0): the adapters' products
// read and write only those rows; xa, when given, holds their values and is what backward keeps
// (a view of x would keep all of x alive).
struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                            at::TensorList downs, at::TensorList ups, std::vector<int64_t> offsets,
                            std::vector<double> scales, const std::optional<at::Tensor>& w_scale_opt,
                            int64_t row0, int64_t row1, const std::optional<at::Tensor>& xa_opt) {
    // Optional: autograd's custom functions take no undefined tensor arguments.
    const at::Tensor w_scale = w_scale_opt.value_or(at::Tensor());
    const int64_t k = static_cast<int64_t>(downs.size()), in = x.size(-1), out = w.size(0);
    const auto dt = x.scalar_type();
    const at::Tensor x2 = x.reshape({-1, in});
    if (row1 < 0) row0 = 0, row1 = x2.size(0);
    TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 <= x2.size(0), "lora_linear: adapter rows [", row0, ", ", row1,
                ") outside the ", x2.size(0), " rows");
    const at::Tensor xa = xa_opt ? xa_opt->reshape({-1, in}) : x2.narrow(0, row0, row1 - row0);
    TORCH_CHECK(xa.size(0) == row1 - row0, "lora_linear: the adapter rows' values must be ", row1 - row0, " rows");
    std::vector<int64_t> ranks;
    for (const auto& d : downs) ranks.push_back(d.size(0));
    const at::Tensor D = (k == 1 ? downs[0] : at::cat(downs, 0)).to(dt);
    const at::Tensor h = at::mm(xa, D.t());
    const bool fp8 = w.scalar_type() == at::kFloat8_e4m3fn;
    at::Tensor y = fp8 ? kernels::fp8_linear_forward(x2, w, w_scale, b)
                       : (b.defined() ? at::addmm(b, x2, w.t()) : at::mm(x2, w.t()));
    std::vector<at::Tensor> U;
    const at::Tensor ya = y.narrow(0, row0, row1 - row0);
    int64_t r0 = 0;
    for (int64_t i = 0; i < k; ++i) {
      U.push_back(ups[i].to(dt));
      ya.narrow(1, offsets[i], ups[i].size(0)).addmm_(h.narrow(1, r0, ranks[i]), U[i].t(), 1.0, scales[i]);
      r0 += ranks[i];
    }
    // Saved only where backward needs them, as autograd on the plain ops would: w for the input
    // gradient (a streamed block's weights must not outlive their use), x for the downs'.
    const bool x_grad = x.requires_grad();
    bool down_grad = false;
    for (const auto& d : downs) down_grad = down_grad || d.requires_grad();
    variable_list saved{down_grad ? xa : at::Tensor(), x_grad ? w : at::Tensor(), D, h};
    saved.insert(saved.end(), U.begin(), U.end());
    saved.push_back(x_grad && fp8 ? w_scale : at::Tensor());
    ctx->save_for_backward(saved);
    ctx->saved_data["offsets"] = offsets;
    ctx->saved_data["scales"] = scales;
    ctx->saved_data["ranks"] = ranks;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["out"] = out;
    ctx->saved_data["row0"] = row0;
    std::vector<int64_t> master_dtypes;
    for (int64_t i = 0; i < k; ++i) {
      master_dtypes.push_back(static_cast<int64_t>(downs[i].scalar_type()));
      master_dtypes.push_back(static_cast<int64_t>(ups[i].scalar_type()));
    }
    ctx->saved_data["master_dtypes"] = master_dtypes;
    auto sizes = x.sizes().vec();
    sizes.back() = out;
    return y.view(sizes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &xa = saved[0], &w = saved[1], &D = saved[2], &h = saved[3];
    const auto offsets = ctx->saved_data["offsets"].toIntVector();
    const auto scales = ctx->saved_data["scales"].toDoubleVector();
    const auto ranks = ctx->saved_data["ranks"].toIntVector();
    const auto x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    const auto master_dtypes = ctx->saved_data["master_dtypes"].toIntVector();
    const int64_t k = static_cast<int64_t>(ranks.size());
    // Inputs in forward's order: x, w, b, downs[k], ups[k], offsets, scales, w_scale, row0, row1, xa.
    variable_list result(3 + 2 * k + 6);
    if (!grads[0].defined()) return result;
    const at::Tensor dy = grads[0].reshape({-1, ctx->saved_data["out"].toInt()});
    // The adapter rows of dy (h's rows).
    const at::Tensor dya = dy.narrow(0, ctx->saved_data["row0"].toInt(), h.size(0));
    const int64_t rows = dya.size(0);

    const bool need_x = ctx->needs_input_grad(0);
    bool need_down = false;
    for (int64_t i = 0; i < k; ++i) need_down = need_down || ctx->needs_input_grad(3 + i);

    const std::vector<at::Tensor> U(saved.begin() + 4, saved.begin() + 4 + k);
    at::Tensor dh;
    if (need_x || need_down) dh = adapters_dh(dya, U, offsets, scales);
    int64_t r0 = 0;
    for (int64_t i = 0; i < k; ++i) {
      if (ctx->needs_input_grad(3 + k + i))
        result[3 + k + i] = adapter_up_grad(dya, h, r0, U[i], offsets[i], scales[i],
                                            static_cast<at::ScalarType>(master_dtypes[2 * i + 1]));
      r0 += ranks[i];
    }
    if (need_down) {
      // One product for the stacked downs; each adapter's gradient is its rows (a view: autograd
      // takes it as the .grad as it is, the rows of different adapters never overlap).
      bool one_dtype = true;
      for (int64_t i = 1; i < k; ++i) one_dtype = one_dtype && master_dtypes[2 * i] == master_dtypes[0];
      const auto first_dtype = static_cast<at::ScalarType>(master_dtypes[0]);
      const at::Tensor dD = one_dtype ? matmul_to(dh.t(), xa, first_dtype) : at::mm(dh.t(), xa);
      r0 = 0;
      for (int64_t i = 0; i < k; ++i) {
        const auto down_dtype = static_cast<at::ScalarType>(master_dtypes[2 * i]);
        if (ctx->needs_input_grad(3 + i)) result[3 + i] = dD.narrow(0, r0, ranks[i]).to(down_dtype);
        r0 += ranks[i];
      }
    }
    if (need_x) {
      at::Tensor dx = w.scalar_type() == at::kFloat8_e4m3fn ? kernels::fp8_linear_input_grad(dy, w, saved[4 + k])
                                                            : at::mm(dy, w);
      dx.narrow(0, ctx->saved_data["row0"].toInt(), rows).addmm_(dh, D);
      result[0] = dx.view(x_sizes);
    }
    return result;
  }
};

// y + scale * (y D^T) U^T (an output-side adapter, EasyControl's proj_loras) as one node: forward
// two GEMMs (the second accumulates into a copy of y, beta = 1), backward four (dh, dU, dD, and dy
// accumulated onto the output gradient). Autograd on the plain ops adds the casts' backward, a
// scale and an add: about twice the kernels.
struct OutputLoraFunction : public torch::autograd::Function<OutputLoraFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& down, const at::Tensor& up,
                            double scale) {
    const auto dt = y.scalar_type();
    const int64_t n = y.size(-1);
    const at::Tensor y2 = y.reshape({-1, n});
    const at::Tensor D = down.to(dt), U = up.to(dt);
    const at::Tensor h = at::mm(y2, D.t());
    at::Tensor out = at::addmm(y2, h, U.t(), 1.0, scale);
    ctx->save_for_backward({down.requires_grad() ? y2 : at::Tensor(), D, U, h});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dtypes"] = std::vector<int64_t>{static_cast<int64_t>(down.scalar_type()),
                                                      static_cast<int64_t>(up.scalar_type())};
    return out.view(y.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &y2 = saved[0], &D = saved[1], &U = saved[2], &h = saved[3];
    const double scale = ctx->saved_data["scale"].toDouble();
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    variable_list result(4);
    if (!grads[0].defined()) return result;
    const auto sizes = grads[0].sizes().vec();
    const at::Tensor dout = grads[0].reshape({-1, sizes.back()});
    if (ctx->needs_input_grad(2)) {
      at::Tensor g = matmul_to(dout.t(), h, static_cast<at::ScalarType>(dtypes[1]));
      result[2] = scale == 1.0 ? g : g.mul_(scale);
    }
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      at::Tensor dh = at::empty({dout.size(0), U.size(1)}, dout.options());
      at::addmm_out(dh, dh, dout, U, 0.0, scale);  // beta 0: dh's contents unread
      if (ctx->needs_input_grad(1)) result[1] = matmul_to(dh.t(), y2, static_cast<at::ScalarType>(dtypes[0]));
      if (ctx->needs_input_grad(0)) result[0] = at::addmm(dout, dh, D).view(sizes);
    }
    return result;
  }
};

}  // namespace

at::Tensor output_lora(const at::Tensor& y, const at::Tensor& down, const at::Tensor& up, double scale) {
  TORCH_CHECK(down.dim() == 2 && up.dim() == 2 && down.size(1) == y.size(-1) && up.size(0) == y.size(-1) &&
                  up.size(1) == down.size(0),
              "output_lora: down [r, n] and up [n, r] for an output of n features");
  return OutputLoraFunction::apply(y, down, up, scale);
}

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                       const std::vector<at::Tensor>& downs, const std::vector<at::Tensor>& ups,
                       const std::vector<int64_t>& offsets, const std::vector<double>& scales,
                       const at::Tensor& w_scale, int64_t row_begin, int64_t row_end, const at::Tensor& rows_x) {
  TORCH_CHECK(!downs.empty() && downs.size() == ups.size() && offsets.size() == downs.size() &&
                  scales.size() == downs.size(),
              "lora_linear: one down, up, offset and scale per adapter");
  return LoraLinearFunction::apply(x, w, b, at::TensorList(downs), at::TensorList(ups), offsets, scales,
                                   w_scale.defined() ? std::optional<at::Tensor>(w_scale) : std::nullopt, row_begin,
                                   row_end, rows_x.defined() ? std::optional<at::Tensor>(rows_x) : std::nullopt);
}

at::Tensor matmul_to(const at::Tensor& a, const at::Tensor& b, at::ScalarType out) {
  const auto dt = a.scalar_type();
  if (a.is_cuda() && out == at::kFloat && (dt == at::kBFloat16 || dt == at::kHalf)) return at::mm(a, b, at::kFloat);
  return at::mm(a, b).to(out);
}

at::Tensor adapters_dh(const at::Tensor& dy, const std::vector<at::Tensor>& U, const std::vector<int64_t>& offsets,
                       const std::vector<double>& scales) {
  int64_t r = 0;
  for (const auto& u : U) r += u.size(1);
  at::Tensor dh = at::empty({dy.size(0), r}, dy.options());
  int64_t r0 = 0;
  for (size_t i = 0; i < U.size(); ++i) {
    at::Tensor dhi = dh.narrow(1, r0, U[i].size(1));
    at::addmm_out(dhi, dhi, dy.narrow(1, offsets[i], U[i].size(0)), U[i], 0.0, scales[i]);  // beta 0: unread
    r0 += U[i].size(1);
  }
  return dh;
}

at::Tensor adapter_up_grad(const at::Tensor& dy, const at::Tensor& h, int64_t r0, const at::Tensor& U_i,
                           int64_t offset, double scale, at::ScalarType dtype) {
  at::Tensor g = matmul_to(dy.narrow(1, offset, U_i.size(0)).t(), h.narrow(1, r0, U_i.size(1)), dtype);
  return scale == 1.0 ? g : g.mul_(scale);
}

at::Tensor fp8_scale_rows(const at::Tensor& w_scale, int64_t begin, int64_t n) {
  return !w_scale.defined() || w_scale.numel() == 1 || (begin == 0 && n == w_scale.size(0))
             ? w_scale
             : w_scale.narrow(0, begin, n);
}

at::Tensor frozen_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& w_scale) {
  if (w.scalar_type() == at::kFloat8_e4m3fn) {
    TORCH_CHECK(w_scale.defined(), "frozen_linear: an e4m3 weight without its fp8 scales");
    return kernels::fp8_linear(x, w, w_scale, b);
  }
  return at::linear(x, w, b);
}

}  // namespace fluxtrain
