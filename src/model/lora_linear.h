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
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                       const std::vector<at::Tensor>& downs, const std::vector<at::Tensor>& ups,
                       const std::vector<int64_t>& offsets, const std::vector<double>& scales);

}  // namespace fluxtrain
