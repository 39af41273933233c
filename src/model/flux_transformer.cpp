#include "model/flux_transformer.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "model/block_runner.h"
#include "model/blocks.h"
#include "model/condition_cache.h"
#include "model/layers.h"

namespace fluxtrain {
namespace {

std::string sizes(const at::Tensor& t) {
  std::ostringstream ss;
  ss << t.sizes();
  return ss.str();
}

void check_inputs(const FluxConfig& cfg, const FluxInputs& in, bool read_cond) {
  auto need = [](bool ok, const std::string& msg) {
    if (!ok) throw Error("transformer inputs: " + msg);
  };
  need(in.img.defined() && in.img.dim() == 3 && in.img.size(2) == cfg.in_channels,
       "img must be [B, L, " + std::to_string(cfg.in_channels) + "], got " + (in.img.defined() ? sizes(in.img) : "none"));
  const int64_t B = in.img.size(0), L = in.img.size(1);
  need(in.img_ids.defined() && in.img_ids.dim() == 2 && in.img_ids.size(0) == L && in.img_ids.size(1) == 3,
       "img_ids must be [" + std::to_string(L) + ", 3]");
  need(in.txt.defined() && in.txt.dim() == 3 && in.txt.size(0) == B && in.txt.size(2) == cfg.context_in_dim,
       "txt must be [B, T, " + std::to_string(cfg.context_in_dim) + "], got " + (in.txt.defined() ? sizes(in.txt) : "none"));
  need(in.txt_ids.defined() && in.txt_ids.dim() == 2 && in.txt_ids.size(0) == in.txt.size(1) && in.txt_ids.size(1) == 3,
       "txt_ids must be [T, 3]");
  need(in.y.defined() && in.y.dim() == 2 && in.y.size(0) == B && in.y.size(1) == cfg.vec_in_dim,
       "y must be [B, " + std::to_string(cfg.vec_in_dim) + "]");
  need(in.timesteps.defined() && in.timesteps.numel() == B, "timesteps must have B values");
  if (cfg.guidance_embed) need(in.guidance.defined() && in.guidance.numel() == B, "guidance must have B values (dev model)");
  if (!read_cond) return;
  need(in.cond.size() == in.cond_ids.size(), "cond and cond_ids must come in pairs");
  for (size_t n = 0; n < in.cond.size(); ++n) {
    const auto& c = in.cond[n];
    need(c.defined() && c.dim() == 3 && c.size(0) == B && c.size(2) == cfg.in_channels,
         "cond " + std::to_string(n) + " must be [B, Lc, " + std::to_string(cfg.in_channels) + "]");
    need(in.cond_ids[n].dim() == 2 && in.cond_ids[n].size(0) == c.size(1) && in.cond_ids[n].size(1) == 3,
         "cond_ids " + std::to_string(n) + " must be [Lc, 3]");
  }
}

std::vector<at::Tensor> block_params(const LoraSet* lora, int block) {
  std::vector<at::Tensor> p;
  if (!lora) return p;
  for (const auto& a : lora->adapters())
    if (a.block == block) {
      p.push_back(a.down);
      p.push_back(a.up);
    }
  return p;
}

}  // namespace

at::Tensor flux_forward(const FluxConfig& cfg, BlockWeights& weights, const LoraSet* lora, const FluxInputs& in,
                        const ForwardOptions& opt) {
  ConditionCache* cache = opt.condition_cache;
  const bool use_cache = cache && cache->filled();
  const bool fill_cache = cache && !use_cache && !in.cond.empty();
  check_inputs(cfg, in, !use_cache);
  if (use_cache && cache->batch() != in.img.size(0))
    throw Error("transformer inputs: the condition cache holds " + std::to_string(cache->batch()) +
                " rows, img has " + std::to_string(in.img.size(0)));
  const TensorMap& g = weights.globals();
  const at::Tensor& w0 = g.at("img_in.weight");
  const auto dt = w0.scalar_type();
  const auto dev = w0.device();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  auto on = [&](const at::Tensor& t) { return t.to(dev, dt); };
  if (lora && lora->empty()) lora = nullptr;

  at::Tensor img = linear(on(in.img), g, "img_in");
  at::Tensor txt = linear(on(in.txt), g, "txt_in");
  const at::Tensor t = in.timesteps.to(dev).reshape({-1});
  at::Tensor y_emb = mlp_embedder(on(in.y), g, "vector_in");
  at::Tensor shared = y_emb;  // guidance + pooled text: the same for noise and conditions
  if (cfg.guidance_embed)
    shared = shared + mlp_embedder(timestep_embedding(in.guidance.to(dev).reshape({-1}), 256, dt), g, "guidance_in");
  at::Tensor vec = mlp_embedder(timestep_embedding(t, 256, dt), g, "time_in") + shared;

  BlockContext ctx;
  ctx.cfg = &cfg;
  ctx.lora = lora;
  ctx.rope_main = rope_from_ids(at::cat({in.txt_ids, in.img_ids}, 0).to(dev), cfg.axes_dim, cfg.theta, acc);
  at::Tensor cond, vec_cond;
  if (use_cache) {
    ctx.cond_lens = cache->cond_lens();
  } else if (!in.cond.empty()) {
    std::vector<at::Tensor> parts;
    for (size_t n = 0; n < in.cond.size(); ++n) {
      parts.push_back(linear(on(in.cond[n]), g, "img_in"));
      ctx.cond_lens.push_back(in.cond[n].size(1));
    }
    cond = parts.size() == 1 ? parts[0] : at::cat(parts, 1);
    // Conditions are clean latents: modulated with the embedding of timestep 0.
    vec_cond = mlp_embedder(timestep_embedding(at::zeros_like(t), 256, dt), g, "time_in") + shared;
    ctx.rope_cond = rope_from_ids(at::cat(in.cond_ids, 0).to(dev), cfg.axes_dim, cfg.theta, acc);
    ctx.rope_all = rope_cat({ctx.rope_main, ctx.rope_cond});
  }
  const bool has_cond = cond.defined();
  if (fill_cache) {
    cache->begin(weights.num_blocks(), ctx.cond_lens, in.img.size(0));
    ctx.record = cache;
  }
  // Per block: the recorded condition keys/values stand for the condition stream.
  auto set_cached = [&](int i) {
    if (!use_cache) return;
    ctx.cached_k = cache->keys(i);
    ctx.cached_v = cache->values(i);
  };

  // Activations passed between blocks (only defined tensors go through the block runner).
  auto pack = [&](std::initializer_list<at::Tensor> xs) {
    std::vector<at::Tensor> v;
    for (const auto& x : xs)
      if (x.defined()) v.push_back(x);
    return v;
  };

  for (int i = 0; i < cfg.depth; ++i) {
    ctx.block = i;
    set_cached(i);
    BlockFn fn = [ctx, has_cond](const std::vector<at::Tensor>& a, const TensorMap& w) {
      // a = {img, txt, vec, [cond, vec_cond]}
      return double_block(ctx, w, a[0], a[1], has_cond ? a[3] : at::Tensor(), a[2],
                          has_cond ? a[4] : at::Tensor());
    };
    auto out = run_block(weights, i, fn, pack({img, txt, vec, cond, vec_cond}), block_params(lora, i),
                         opt.gradient_checkpointing);
    img = out[0];
    txt = out[1];
    if (has_cond) cond = out[2];
  }

  const int64_t T = txt.size(1);
  at::Tensor x = at::cat({txt, img}, 1);
  for (int s = 0; s < cfg.depth_single; ++s) {
    const int i = static_cast<int>(cfg.depth) + s;
    ctx.block = i;
    set_cached(i);
    ctx.last_block = s == cfg.depth_single - 1;
    BlockFn fn = [ctx, has_cond](const std::vector<at::Tensor>& a, const TensorMap& w) {
      // a = {x, vec, [cond, vec_cond]}
      return single_block(ctx, w, a[0], has_cond ? a[2] : at::Tensor(), a[1], has_cond ? a[3] : at::Tensor());
    };
    auto out = run_block(weights, i, fn, pack({x, vec, cond, vec_cond}), block_params(lora, i),
                         opt.gradient_checkpointing);
    x = out[0];
    if (has_cond) cond = out[1];
  }
  img = x.narrow(1, T, x.size(1) - T);
  if (fill_cache) cache->finish();

  auto mod = linear(at::silu(vec), g, "final_layer.adaLN_modulation.1").unsqueeze(1).chunk(2, -1);  // shift, scale
  return linear(modulate(img, mod[0], mod[1]), g, "final_layer.linear");
}

}  // namespace fluxtrain
