// The FLUX.1 transformer forward pass with EasyControl's condition branch.
//
// Streams: text (txt_in), noise image (img_in), and one condition stream per condition that
// goes through img_in too and uses the image stream's weights in every block, modulated with
// the embedding at timestep 0. Attention: text+noise queries see all tokens (text, noise, every
// condition); each condition's queries see only that condition's tokens.
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/block_weights.h"
#include "model/flux_config.h"
#include "model/lora.h"

namespace fluxtrain {

struct FluxInputs {
  at::Tensor img;        // [B, L, in_channels]   packed noisy latents
  at::Tensor img_ids;    // [L, 3]                (0, row, col)
  at::Tensor txt;        // [B, T, context_in_dim] T5 embeddings
  at::Tensor txt_ids;    // [T, 3]                zeros
  at::Tensor y;          // [B, vec_in_dim]       CLIP pooled
  at::Tensor timesteps;  // [B] in [0, 1] (sigma)
  at::Tensor guidance;   // [B] (used when cfg.guidance_embed)
  std::vector<at::Tensor> cond;      // per condition [B, Lc_n, in_channels] (clean latents)
  std::vector<at::Tensor> cond_ids;  // per condition [Lc_n, 3]
};

class ConditionCache;

struct ForwardOptions {
  bool gradient_checkpointing = false;  // recompute each block in backward
  // Inference with conditions (model/condition_cache.h): an empty cache is filled by this call
  // (in.cond must be given); a filled one replaces the condition stream, and in.cond/cond_ids
  // are then not read. Null (training): the condition stream runs as always, at no extra cost.
  ConditionCache* condition_cache = nullptr;
};

// Returns the prediction for the noise tokens: [B, L, out_channels].
at::Tensor flux_forward(const FluxConfig& cfg, BlockWeights& weights, const LoraSet* lora,
                        const FluxInputs& in, const ForwardOptions& opt = {});

}  // namespace fluxtrain
