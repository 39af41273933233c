// An independent, deliberately naive float64 re-implementation of FLUX's double and single
// blocks with EasyControl's condition branch, for tests. It shares no code with src/model:
// the whole sequence (text | noise | cond 0 | cond 1 ...) is processed as one set of tokens,
// each token picks its weights and modulation by its type, LoRA is applied through token
// masks the way EasyControl's LoRALinearLayer does, RoPE is computed with explicit loops, and
// attention is softmax over a dense mask.
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"
#include "model/flux_config.h"
#include "model/lora.h"

namespace fluxtrain::ref {

struct RefInputs {
  at::Tensor img, txt;             // [B, L, H], [B, T, H]
  std::vector<at::Tensor> cond;    // [B, Lc_n, H]
  at::Tensor vec, vec_cond;        // [B, H]
  at::Tensor ids;                  // [T + L + sum Lc, 3] in sequence order
};

// Returns {img, txt, cond_0, cond_1, ...}.
std::vector<at::Tensor> double_block(const FluxConfig& cfg, const TensorMap& w, const LoraSet* lora, int block,
                                     const RefInputs& in);
// Single block; in.img holds the text+noise sequence x, in.txt must hold the text part length
// only through T (its values are ignored). Returns {x, cond_0, ...}.
std::vector<at::Tensor> single_block(const FluxConfig& cfg, const TensorMap& w, const LoraSet* lora, int block,
                                     const at::Tensor& x, const std::vector<at::Tensor>& cond, const at::Tensor& vec,
                                     const at::Tensor& vec_cond, const at::Tensor& ids);

// Dense-mask attention: q,k,v [B, heads, N, D], allowed [N, N] bool.
at::Tensor masked_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed);
// EasyControl's mask for (main tokens, condition lengths): main queries see everything,
// condition n's queries see only condition n's keys.
at::Tensor easycontrol_mask(int64_t main_tokens, const std::vector<int64_t>& cond_lens);

}  // namespace fluxtrain::ref
