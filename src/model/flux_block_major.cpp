#include "model/flux_block_major.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "model/block_runner.h"
#include "model/blocks.h"
#include "model/layers.h"
#include "model/rope.h"

namespace fluxtrain {
namespace {

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

// One micro-batch's activations between blocks.
struct Stream {
  BlockContext ctx;
  at::Tensor img, txt, vec, cond, vec_cond, x;
  bool has_cond = false;
  int64_t T = 0;
};

std::vector<at::Tensor> pack(std::initializer_list<at::Tensor> xs) {
  std::vector<at::Tensor> v;
  for (const auto& x : xs)
    if (x.defined()) v.push_back(x);
  return v;
}

}  // namespace

std::vector<at::Tensor> flux_forward_block_major(const FluxConfig& cfg, BlockWeights& weights, const LoraSet* lora,
                                                 const std::vector<FluxInputs>& micro_batches,
                                                 const ForwardOptions& opt) {
  check_input(!micro_batches.empty(), "block-major forward: no micro-batches");
  const TensorMap& g = weights.globals();
  const at::Tensor& w0 = g.at("img_in.weight");
  const auto dt = w0.scalar_type();
  const auto dev = w0.device();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  auto on = [&](const at::Tensor& t) { return t.to(dev, dt); };
  if (lora && lora->empty()) lora = nullptr;

  // Embeddings of every micro-batch (as in flux_forward).
  std::vector<Stream> s(micro_batches.size());
  for (size_t m = 0; m < micro_batches.size(); ++m) {
    const FluxInputs& in = micro_batches[m];
    check_input(in.img.defined() && in.txt.defined() && in.y.defined() && in.timesteps.defined(),
                "block-major forward: micro-batch " + std::to_string(m) + " lacks an input");
    Stream& st = s[m];
    st.img = linear(on(in.img), g, "img_in");
    st.txt = linear(on(in.txt), g, "txt_in");
    const at::Tensor t = in.timesteps.to(dev).reshape({-1});
    at::Tensor shared = mlp_embedder(on(in.y), g, "vector_in");
    if (cfg.guidance_embed)
      shared = shared + mlp_embedder(timestep_embedding(in.guidance.to(dev).reshape({-1}), 256, dt), g, "guidance_in");
    st.vec = mlp_embedder(timestep_embedding(t, 256, dt), g, "time_in") + shared;
    st.ctx.cfg = &cfg;
    st.ctx.lora = lora;
    st.ctx.rope_main = rope_from_ids(at::cat({in.txt_ids, in.img_ids}, 0).to(dev), cfg.axes_dim, cfg.theta, acc);
    if (!in.cond.empty()) {
      std::vector<at::Tensor> parts;
      for (size_t n = 0; n < in.cond.size(); ++n) {
        parts.push_back(linear(on(in.cond[n]), g, "img_in"));
        st.ctx.cond_lens.push_back(in.cond[n].size(1));
      }
      st.cond = parts.size() == 1 ? parts[0] : at::cat(parts, 1);
      st.vec_cond = mlp_embedder(timestep_embedding(at::zeros_like(t), 256, dt), g, "time_in") + shared;
      st.ctx.rope_cond = rope_from_ids(at::cat(in.cond_ids, 0).to(dev), cfg.axes_dim, cfg.theta, acc);
      st.ctx.rope_all = rope_cat({st.ctx.rope_main, st.ctx.rope_cond});
    }
    st.has_cond = st.cond.defined();
    if (cfg.depth == 0) {
      st.T = st.txt.size(1);
      st.x = at::cat({st.txt, st.img}, 1);
    }
  }

  // Block by block, every micro-batch through it before the next block.
  for (int i = 0; i < cfg.num_blocks(); ++i) {
    const bool dbl = i < cfg.depth;
    for (Stream& st : s) {
      st.ctx.block = i;
      st.ctx.last_block = !dbl && i == cfg.num_blocks() - 1;
      const bool has_cond = st.has_cond;
      const BlockContext ctx = st.ctx;
      if (dbl) {
        BlockFn fn = [ctx, has_cond](const std::vector<at::Tensor>& a, const TensorMap& w) {
          return double_block(ctx, w, a[0], a[1], has_cond ? a[3] : at::Tensor(), a[2],
                              has_cond ? a[4] : at::Tensor());
        };
        auto out = run_block(weights, i, fn, pack({st.img, st.txt, st.vec, st.cond, st.vec_cond}),
                             block_params(lora, i), opt.gradient_checkpointing);
        st.img = out[0];
        st.txt = out[1];
        if (has_cond) st.cond = out[2];
        if (i == cfg.depth - 1) {
          st.T = st.txt.size(1);
          st.x = at::cat({st.txt, st.img}, 1);
        }
      } else {
        BlockFn fn = [ctx, has_cond](const std::vector<at::Tensor>& a, const TensorMap& w) {
          return single_block(ctx, w, a[0], has_cond ? a[2] : at::Tensor(), a[1], has_cond ? a[3] : at::Tensor());
        };
        auto out = run_block(weights, i, fn, pack({st.x, st.vec, st.cond, st.vec_cond}), block_params(lora, i),
                             opt.gradient_checkpointing);
        st.x = out[0];
        if (has_cond) st.cond = out[1];
      }
    }
  }

  std::vector<at::Tensor> outs;
  for (Stream& st : s) {
    at::Tensor img = st.x.narrow(1, st.T, st.x.size(1) - st.T);
    auto mod = linear(at::silu(st.vec), g, "final_layer.adaLN_modulation.1").unsqueeze(1).chunk(2, -1);
    outs.push_back(linear(modulate(img, mod[0], mod[1]), g, "final_layer.linear"));
  }
  return outs;
}

}  // namespace fluxtrain
