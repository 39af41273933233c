// A frozen linear with input-side LoRA adapters on row ranges of its output, forward and backward
// written out so that the adapters' products are accumulated into the output and the input
// gradient by the matrix products themselves (beta = 1), not by a concatenation and an add.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fluxtrain {

// y = x w^T + b, then for each adapter i: y[:, offsets[i] : offsets[i] + ups[i].size(0)] +=
// scales[i] * (x downs[i]^T) ups[i]^T. x [..., in]; w [out, in] and b [out] (or undefined) are
// frozen; downs[i] [r_i, in] and ups[i] [n_i, r_i] are the trained masters (any float dtype; used
// in x's dtype, gradients returned in their own). The row ranges must not overlap.
// w may be the fp8 stored form (--fp8_matmul): e4m3 codes with float32 scales w_scale ([out] or
// [1]); its products then go through kernels/fp8_matmul.h. w_scale is unused otherwise.
// row_begin/row_end: the adapters apply only to rows [row_begin, row_end) of x flattened to
// [rows, in] (row_end < 0: all rows), e.g. the condition tokens of a product that also takes the
// main tokens (model/blocks.cpp); rows_x, when given, holds those rows' values (x's own rows,
// computed elsewhere) and is what backward keeps for the downs' gradients instead of a view that
// would keep all of x alive. Other rows get x w^T + b.
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                       const std::vector<at::Tensor>& downs, const std::vector<at::Tensor>& ups,
                       const std::vector<int64_t>& offsets, const std::vector<double>& scales,
                       const at::Tensor& w_scale = {}, int64_t row_begin = 0, int64_t row_end = -1,
                       const at::Tensor& rows_x = {});

// Input-side adapters of one linear on all rows, in lora_linear's form: downs[i] [r_i, in] and
// ups[i] [n_i, r_i] trained masters, adding scales[i] * (x downs[i]^T) ups[i]^T to output columns
// [offsets[i], offsets[i] + n_i). What model/gelu_linear.h takes.
struct InputAdapters {
  std::vector<at::Tensor> downs, ups;
  std::vector<int64_t> offsets;
  std::vector<double> scales;
  bool empty() const { return downs.empty(); }
};

// a @ b in dtype out: on CUDA a 16-bit product for float32 masters comes out of the GEMM in float32
// (at::mm's out_dtype: no rounding to 16 bits and no cast kernel); elsewhere the product cast.
// How the adapters' gradients reach their masters.
at::Tensor matmul_to(const at::Tensor& a, const at::Tensor& b, at::ScalarType out);

// The adapters' backward products that lora_linear and gelu_linear share, for adapters i with
// ups U[i] [n_i, r_i] (in the activations' dtype) on output columns [offsets[i], + n_i) of dy:
//   adapters_dh: dh [rows, sum r_i] with dh_i = scales[i] dy_i U[i] in its columns;
//   adapter_up_grad: dU_i = scales[i] dy_i^T h_i (h's columns r0 .. r0 + r_i) in dtype.
at::Tensor adapters_dh(const at::Tensor& dy, const std::vector<at::Tensor>& U, const std::vector<int64_t>& offsets,
                       const std::vector<double>& scales);
at::Tensor adapter_up_grad(const at::Tensor& dy, const at::Tensor& h, int64_t r0, const at::Tensor& U_i,
                           int64_t offset, double scale, at::ScalarType dtype);

// y + scale * (y down^T) up^T: an adapter on the output of a linear (EasyControl's proj_loras,
// h = h + w * lora(h)), as one autograd node; down [r, n], up [n, r] trained masters (any float
// dtype, gradients in their own), y [..., n].
at::Tensor output_lora(const at::Tensor& y, const at::Tensor& down, const at::Tensor& up, double scale);

// y = x w^T + b without adapters: at::linear, or kernels::fp8_linear when w is the fp8 stored form
// (e4m3 codes with float32 scales w_scale, --fp8_matmul). Where every frozen product of the
// model that may meet a stored weight is dispatched on the weight's dtype.
at::Tensor frozen_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& w_scale = {});

// The fp8 scales of output rows [begin, begin + n) of a stored weight: per-channel scales follow
// the rows, a per-tensor scale (one value) and an undefined one (no fp8 weight) stay as they are.
at::Tensor fp8_scale_rows(const at::Tensor& w_scale, int64_t begin, int64_t n);

}  // namespace fluxtrain
