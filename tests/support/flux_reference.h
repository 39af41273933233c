// An independent, deliberately naive float64 re-implementation of FLUX's double and single
// blocks with EasyControl's condition branch, for tests. It shares no code with src/model and
// is written from EasyControl's formulas (docs/easycontrol.md, train/src/layers.py and
// train/src/transformer_flux.py of Xiaojiu-z/EasyControl), not from fluxtrain's:
// the whole sequence (text | noise | cond 0 | cond 1 ...) is processed as one set of tokens,
// each token picks its weights and modulation by its type, and the LoRA weights are read by
// EasyControl's own key names from an EasyControl-format state dict. Each LoRA sees the block
// input masked to its condition's rows (LoRALinearLayer); q/k/v LoRAs add to to_q/to_k/to_v of
// the block input, the double blocks' projection LoRA reads the *output* of to_out[0] and is
// applied condition after condition, h = h + w_i * lora_i(h). RoPE is computed with explicit
// loops, and attention is softmax over a dense mask.
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"
#include "model/flux_config.h"

namespace fluxtrain::ref {

struct RefInputs {
  at::Tensor img, txt;             // [B, L, H], [B, T, H]
  std::vector<at::Tensor> cond;    // [B, Lc_n, H]
  at::Tensor vec, vec_cond;        // [B, H]
  at::Tensor ids;                  // [T + L + sum Lc, 3] in sequence order
};

// An EasyControl LoRA as EasyControl saves it: keys
// "transformer_blocks.{i}.attn.processor.{q,k,v,proj}_loras.{n}.{down,up}.weight" and
// "single_transformer_blocks.{j}.attn.processor.{q,k,v}_loras.{n}.{down,up}.weight".
// The rank of condition n is the row count of its down weight; scale = network_alphas[n] / rank.
struct EasyControlLora {
  TensorMap weights;
  std::vector<double> network_alphas;  // one per condition
  std::vector<double> lora_weights;    // EasyControl's per-condition multiplier (1 in train.py)
};

// Double block i (its own index among the double blocks). Returns {img, txt, cond_0, cond_1, ...}.
std::vector<at::Tensor> double_block(const FluxConfig& cfg, const TensorMap& w, const EasyControlLora* lora,
                                     int double_index, const RefInputs& in);
// Single block j (its own index among the single blocks); x is the text+noise sequence, the
// first T tokens of it text. Returns {x, cond_0, ...}.
std::vector<at::Tensor> single_block(const FluxConfig& cfg, const TensorMap& w, const EasyControlLora* lora,
                                     int single_index, const at::Tensor& x, const std::vector<at::Tensor>& cond,
                                     const at::Tensor& vec, const at::Tensor& vec_cond, const at::Tensor& ids);

// Dense-mask attention: q,k,v [B, heads, N, D], allowed [N, N] bool.
at::Tensor masked_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed);
// EasyControl's mask for (main tokens, condition lengths): main queries see everything,
// condition n's queries see only condition n's keys.
at::Tensor easycontrol_mask(int64_t main_tokens, const std::vector<int64_t>& cond_lens);

}  // namespace fluxtrain::ref
