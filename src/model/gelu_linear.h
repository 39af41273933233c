// The frozen linear after FLUX's tanh-GELU, as one autograd node:
//
//   y = cat(xs..., gelu_tanh(pre), -1) w^T + b
//
// (the MLP's down projection: xs empty; a single block's linear2 over [attention, GELU(mlp)]:
// xs = {attention}). Its backward gives pre its gradient through kernels::matmul_dgelu: on CUDA
// one GEMM whose epilogue applies GELU's derivative, instead of a GEMM writing the activation's
// gradient and a GELU backward reading it again (docs/benchmarks.md, session 12). The forward is
// the same kernels as the unfused ops (GELU, then the GEMMs), and GELU's output is not saved:
// only pre is, as autograd saved it for the GELU backward.
//
// For linears without adapters on these tokens (the caller checks): w and b get no gradient.
// w may be the fp8 stored form (e4m3 codes with float32 scales w_scale, --fp8_matmul): then the
// concatenated input is quantised as one matrix without being concatenated, GELU applied by the
// quantiser as it reads pre (no activation is written), multiplied by one scaled fp8 GEMM
// (kernels/fp8_matmul.h), and its gradient comes from one such GEMM too.
// adapters (optional): input-side LoRA adapters on all rows of this linear (a standard-mode
// proj_out or ff.net.2), y += scales[i] (cat(xs..., GELU(pre)) downs[i]^T) ups[i]^T, inside the same
// node: the input is never concatenated (the adapters' down products run per input block, the
// second accumulated into the first), and each input's gradient is its own dense product, so
// GELU's backward runs on a dense tensor. Without this, an adapted linear took cat(xs, GELU(pre))
// through lora_linear and GELU's backward ran on a column view of its input gradient (8 ms of the
// 1024-px plain-LoRA step, docs/benchmarks.md, session 16). GELU(pre) is kept for the downs'
// gradient, as lora_linear keeps its input.
// compute_output false: y is allocated but not computed, for a checkpointed block's replay
// (model/recompute.h: nothing reads the output of the linear before a gated residual there),
// which then skips GELU's forward as well; it counts as a skipped linear in recompute_stats().
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/lora_linear.h"

namespace fluxtrain {

at::Tensor gelu_linear(const std::vector<at::Tensor>& xs, const at::Tensor& pre, const at::Tensor& w,
                       const at::Tensor& b, bool compute_output, const at::Tensor& w_scale = {},
                       const InputAdapters& adapters = {});

// The MLP with both linears frozen in the fp8 stored form (--fp8_matmul) as one autograd node:
//
//   pre = x w_up^T + b_up,   y = cat(xs..., gelu_tanh(pre), -1) w_down^T + b_down
//
// (a double block's MLP: xs empty; a single block's MLP columns of linear1 and its linear2:
// xs = {attention}). The same products and numerics as frozen_linear followed by gelu_linear,
// but GELU's backward is applied by the quantiser of the up projection's input gradient
// (kernels::fp8_linear_input_grad_through_gelu): the pre-activation's gradient, the widest tensor
// of the block, is never written nor read back. pre is kept for backward, as gelu_linear keeps it.
// Only for linears without adapters on these tokens (the caller checks); compute_output false:
// y is allocated but not computed (pre still is), as gelu_linear's.
// FLUXTRAIN_FP8_MLP_NODE=0 (read once) makes fp8_gelu_mlp_enabled() false: the callers then
// compose frozen_linear and gelu_linear (an A/B switch).
at::Tensor fp8_gelu_mlp(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& b_up, const at::Tensor& ws_up,
                        const std::vector<at::Tensor>& xs, const at::Tensor& w_down, const at::Tensor& b_down,
                        const at::Tensor& ws_down, bool compute_output);
bool fp8_gelu_mlp_enabled();

}  // namespace fluxtrain
