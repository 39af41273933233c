// FLUX double- and single-stream blocks with EasyControl's condition stream, and the split
// attention they share. Pure functions of (activations, block weights): no state, no devices.
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"
#include "model/flux_config.h"
#include "model/lora.h"
#include "model/rope.h"

namespace fluxtrain {

class ConditionCache;

struct BlockContext {
  const FluxConfig* cfg = nullptr;
  const LoraSet* lora = nullptr;
  int block = 0;                  // global block index
  std::vector<int64_t> cond_lens; // tokens per condition (empty: no condition stream)
  Rope rope_main;                 // text + noise tokens
  Rope rope_cond;                 // all condition tokens, in order
  Rope rope_all;                  // rope_main then rope_cond (undefined: the blocks join them)
  bool last_block = false;        // condition stream's own output is not needed after it
  // Condition KV cache (inference, model/condition_cache.h). cached_k/cached_v defined: the
  // condition stream is absent (cond undefined) and these are its keys (after RoPE) and values.
  // record set: the block stores the condition keys/values it computes there.
  at::Tensor cached_k, cached_v;
  ConditionCache* record = nullptr;
};

// Text+noise queries attend to all keys (text, noise, every condition); each condition's
// queries attend only to that condition's keys. No dense mask: one attention call for the
// main queries and one (batched when condition sizes are equal) for the conditions, so the
// fused/flash kernels apply. q/k/v: [B, heads, L, D]. Returns [B, L, heads*D] for each.
// out_cond is left undefined when q_cond is undefined.
at::Tensor split_attention(const at::Tensor& q_main, const at::Tensor& k_main, const at::Tensor& v_main,
                           const at::Tensor& q_cond, const at::Tensor& k_cond, const at::Tensor& v_cond,
                           const std::vector<int64_t>& cond_lens, at::Tensor* out_cond);
// The same with the keys and values of all tokens (main, then condition) already joined: k_all,
// v_all [B, heads, L_main + L_cond, D]; k_cond, v_cond their condition tokens (views of them
// from qk_norm_rope_split, model/rope.h).
at::Tensor joint_split_attention(const at::Tensor& q_main, const at::Tensor& k_all, const at::Tensor& v_all,
                                 const at::Tensor& q_cond, const at::Tensor& k_cond, const at::Tensor& v_cond,
                                 const std::vector<int64_t>& cond_lens, at::Tensor* out_cond);

// Process-wide attention backend choice, called once by each subcommand (train through
// make_runtime) before running the model. cuDNN's fused attention is about 2x faster than
// LibTorch's flash attention (FlashAttention-2) in backward on the H200, and SDPA picks it first.
// FLUXTRAIN_SDP_CUDNN=0 takes it out of SDPA's choices (flash attention everywhere); unset,
// "auto" or "1" leave it in. Every call goes through sdpa() in blocks.cpp, which keeps LibTorch's
// cuDNN backward from reusing a graph built for another gradient layout (the failure of sessions
// 6-7, docs/benchmarks.md, session 10).
void configure_attention_backends();

// img [B,L,H], txt [B,T,H], cond [B,Lc,H] or undefined; vec, vec_cond [B,H].
// Returns {img, txt, cond}.
std::vector<at::Tensor> double_block(const BlockContext& ctx, const TensorMap& w, const at::Tensor& img,
                                     const at::Tensor& txt, const at::Tensor& cond, const at::Tensor& vec,
                                     const at::Tensor& vec_cond);

// x = cat(txt, img) [B,T+L,H]. Returns {x, cond}.
std::vector<at::Tensor> single_block(const BlockContext& ctx, const TensorMap& w, const at::Tensor& x,
                                     const at::Tensor& cond, const at::Tensor& vec, const at::Tensor& vec_cond);

}  // namespace fluxtrain
