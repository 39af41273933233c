// Small building blocks of the FLUX transformer, as pure functions of tensors.
#pragma once
#include <array>
#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"

namespace fluxtrain {

// Sinusoidal embedding of t in [0,1] (scaled by 1000 as FLUX does): [B] -> [B, dim], cos first.
at::Tensor timestep_embedding(const at::Tensor& t, int64_t dim, at::ScalarType out_dtype);
// in_layer -> SiLU -> out_layer  (time_in, vector_in, guidance_in)
at::Tensor mlp_embedder(const at::Tensor& x, const TensorMap& g, const std::string& prefix);
// LayerNorm over the last dim without affine parameters, eps 1e-6.
at::Tensor layer_norm(const at::Tensor& x);
// RMSNorm over the last dim in float32, eps 1e-6, then times scale (FLUX's QK norm).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& scale);
// Plain-autograd version of the same (tests compare values and gradients).
at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& scale);
// (1 + scale) * LayerNorm(x) + shift; shift/scale are [B, 1, H]. On CUDA (not float64, fused
// kernels enabled, arguments the kernel takes) modulate_fused; elsewhere the plain ATen
// expression addcmul(shift, layer_norm(x), 1 + scale).
at::Tensor modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale);
// The fused modulated LayerNorm (kernels/modulated_layer_norm.h) as an autograd function with a
// hand-written backward, on any device (CPU: its ATen reference). Saves x, scale and the per-row
// float32 mean and 1/std; computes only the gradients that are needed.
at::Tensor modulate_fused(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale);
// {x, modulate(x)} for an x that also feeds a residual: use the first for the residual. On the
// fused path the two are one node whose backward sums x's two gradients inside the norm's dx
// kernel (one pass fewer over [B, L, H]); elsewhere it is x itself and modulate(x).
std::array<at::Tensor, 2> modulate_residual(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale);

// FLUX's gated residual r + gate * y (gate [B, 1, H] broadcast over the tokens) as one node. Its
// backward passes the gradient to r as it is, gives y the gradient times the gate (one kernel) and
// the gate its token sum only when the gate wants one. The same values as at::addcmul's node;
// that one also multiplies the gate by addcmul's scalar (1) first: one more kernel per call, 189
// per step at 512/1024/128 (docs/benchmarks.md, session 13).
at::Tensor gated_residual(const at::Tensor& r, const at::Tensor& gate, const at::Tensor& y);
// The fused node itself (tests call it on CPU tensors too: the kernels' references run there).
std::array<at::Tensor, 2> modulate_residual_fused(const at::Tensor& x, const at::Tensor& shift,
                                                  const at::Tensor& scale);
// Whether the model uses the fused CUDA kernels of kernels/ (modulate, the attention prologue):
// yes unless the environment sets FLUXTRAIN_FUSED_KERNELS=0 (read once).
bool fused_kernels_enabled();
// Linear layer weight[prefix.weight], bias[prefix.bias] (bias optional); an fp8 stored weight
// (--fp8_matmul) is multiplied as such (frozen_linear, model/lora_linear.h).
at::Tensor linear(const at::Tensor& x, const TensorMap& w, const std::string& prefix);
// The float32 scales of weight `weight_name` when the map holds it in the fp8 stored form
// (name + kernels::kFp8ScaleSuffix, kernels/fp8.h); undefined otherwise.
at::Tensor fp8_scale_of(const TensorMap& w, const std::string& weight_name);

}  // namespace fluxtrain
