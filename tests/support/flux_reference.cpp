#include "support/flux_reference.h"

#include <cmath>

#include <ATen/ATen.h>

namespace fluxtrain::ref {
namespace {

using at::Tensor;

Tensor W(const TensorMap& w, const std::string& k) { return w.at(k).to(at::kDouble); }

// x @ w^T + b, written out as a matmul of doubles.
Tensor lin(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  Tensor y = at::matmul(x, weight.t());
  return bias.defined() ? y + bias : y;
}

Tensor layernorm(const Tensor& x) {
  Tensor mean = x.mean(-1, true);
  Tensor var = (x - mean).pow(2).mean(-1, true);
  return (x - mean) / at::sqrt(var + 1e-6);
}

Tensor gelu_tanh(const Tensor& x) {
  return 0.5 * x * (1 + at::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x.pow(3))));
}

Tensor ref_silu(const Tensor& x) { return x / (1 + at::exp(-x)); }

Tensor rmsnorm(const Tensor& x, const Tensor& scale) {
  return x / at::sqrt(x.pow(2).mean(-1, true) + 1e-6) * scale;
}

// Explicit per-token, per-pair rotation.
Tensor rope(const Tensor& x, const Tensor& ids, const std::vector<int64_t>& axes, double theta) {
  // x [B, h, N, D]
  Tensor out = x.clone();
  auto xa = x.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  auto ia = ids.accessor<double, 2>();
  for (int64_t n = 0; n < x.size(2); ++n) {
    int64_t base = 0;
    for (size_t a = 0; a < axes.size(); ++a) {
      for (int64_t j = 0; j < axes[a] / 2; ++j) {
        const double ang = ia[n][a] * std::pow(theta, -2.0 * j / axes[a]);
        const double c = std::cos(ang), s = std::sin(ang);
        const int64_t d = base + 2 * j;
        for (int64_t b = 0; b < x.size(0); ++b)
          for (int64_t h = 0; h < x.size(1); ++h) {
            const double x0 = xa[b][h][n][d], x1 = xa[b][h][n][d + 1];
            oa[b][h][n][d] = c * x0 - s * x1;
            oa[b][h][n][d + 1] = s * x0 + c * x1;
          }
      }
      base += axes[a];
    }
  }
  return out;
}

// EasyControl's LoRALinearLayer number n of module `name` ("q_loras", "proj_loras", ...) under
// `processor` ("transformer_blocks.3.attn.processor"): the input is multiplied by a mask that
// keeps only condition n's rows, then up(down(.)) * network_alpha / rank, then times the
// processor's lora_weights[n]. `type` holds each token's condition index (< 0: not a condition).
Tensor easycontrol_lora(const EasyControlLora& lora, const std::string& processor, const std::string& name, int n,
                        const Tensor& hidden, const std::vector<int>& type) {
  const std::string key = processor + "." + name + "." + std::to_string(n);
  Tensor down = W(lora.weights, key + ".down.weight"), up = W(lora.weights, key + ".up.weight");
  Tensor mask = at::zeros({hidden.size(1), 1}, hidden.options());
  for (size_t t = 0; t < type.size(); ++t)
    if (type[t] == n) mask[t] = 1.0;
  const double rank = static_cast<double>(down.size(0));
  return lora.lora_weights.at(n) * (lin(lin(hidden * mask, down, {}), up, {}) * (lora.network_alphas.at(n) / rank));
}

// query/key/value of the processor: to_q(h) + sum_n w_n * q_loras[n](h), etc. on rows [0, 3H).
Tensor add_qkv_loras(const EasyControlLora* lora, const std::string& processor, const Tensor& qkv,
                     const Tensor& hidden, const std::vector<int>& type, int64_t H) {
  if (!lora) return qkv;
  Tensor out = qkv.clone();
  const char* names[3] = {"q_loras", "k_loras", "v_loras"};
  for (int j = 0; j < 3; ++j)
    for (size_t n = 0; n < lora->network_alphas.size(); ++n)
      out.narrow(2, j * H, H).add_(easycontrol_lora(*lora, processor, names[j], static_cast<int>(n), hidden, type));
  return out;
}

Tensor heads(const Tensor& x, int64_t h) {  // [B, N, H] -> [B, h, N, D]
  return x.view({x.size(0), x.size(1), h, x.size(2) / h}).transpose(1, 2);
}

}  // namespace

at::Tensor easycontrol_mask(int64_t main_tokens, const std::vector<int64_t>& cond_lens) {
  int64_t n = main_tokens;
  for (int64_t l : cond_lens) n += l;
  Tensor m = at::zeros({n, n}, at::kBool);
  m.narrow(0, 0, main_tokens).fill_(true);
  int64_t off = main_tokens;
  for (int64_t l : cond_lens) {
    m.narrow(0, off, l).narrow(1, off, l).fill_(true);
    off += l;
  }
  return m;
}

at::Tensor masked_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed) {
  Tensor s = at::matmul(q.to(at::kDouble), k.to(at::kDouble).transpose(-1, -2)) / std::sqrt(double(q.size(-1)));
  s = s.masked_fill(allowed.logical_not(), -INFINITY);
  Tensor p = at::exp(s - std::get<0>(s.max(-1, true)));
  p = p / p.sum(-1, true);
  return at::matmul(p, v.to(at::kDouble));
}

std::vector<at::Tensor> double_block(const FluxConfig& cfg, const TensorMap& w, const EasyControlLora* lora,
                                     int double_index, const RefInputs& in) {
  const std::string processor = "transformer_blocks." + std::to_string(double_index) + ".attn.processor";
  const int64_t B = in.img.size(0), T = in.txt.size(1), L = in.img.size(1), H = cfg.hidden_size,
                h = cfg.num_heads;
  std::vector<int64_t> lens;
  std::vector<Tensor> parts{in.txt, in.img};
  for (const auto& c : in.cond) {
    lens.push_back(c.size(1));
    parts.push_back(c);
  }
  Tensor x = at::cat(parts, 1).to(at::kDouble);
  const int64_t N = x.size(1);
  // Token types: -2 text, -1 noise, n condition n.
  std::vector<int> type(N);
  for (int64_t i = 0; i < N; ++i) type[i] = i < T ? -2 : -1;
  {
    int64_t off = T + L;
    for (size_t n = 0; n < lens.size(); ++n)
      for (int64_t i = 0; i < lens[n]; ++i) type[off++] = static_cast<int>(n);
  }

  auto mods = [&](const std::string& name, const Tensor& v) {
    return lin(ref_silu(v.to(at::kDouble)), W(w, name + ".weight"), W(w, name + ".bias")).chunk(6, -1);
  };
  auto im = mods("img_mod.lin", in.vec), txt_m = mods("txt_mod.lin", in.vec);
  std::vector<Tensor> cm = in.cond.empty() ? std::vector<Tensor>() : mods("img_mod.lin", in.vec_cond);
  // Per-token modulation chunk c: [B, N, H].
  auto per_token = [&](int c) {
    Tensor out = at::empty({B, N, H}, x.options());
    for (int64_t i = 0; i < N; ++i)
      out.select(1, i).copy_(type[i] == -2 ? txt_m[c] : type[i] == -1 ? im[c] : cm[c]);
    return out;
  };
  // Per-token linear: text tokens use txt_* (add_*_proj, to_add_out, ff_context), noise and
  // condition tokens img_* (to_q/k/v, to_out[0], ff).
  auto tok_lin = [&](const Tensor& a, const std::string& img_name, const std::string& txt_name) {
    Tensor yi = lin(a, W(w, img_name + ".weight"), W(w, img_name + ".bias"));
    Tensor yt = lin(a, W(w, txt_name + ".weight"), W(w, txt_name + ".bias"));
    Tensor y = yi.clone();
    y.narrow(1, 0, T).copy_(yt.narrow(1, 0, T));
    return y;
  };
  Tensor xn = layernorm(x) * (1 + per_token(1)) + per_token(0);
  Tensor qkv = add_qkv_loras(lora, processor, tok_lin(xn, "img_attn.qkv", "txt_attn.qkv"), xn, type, H);
  auto qkvc = qkv.chunk(3, -1);
  Tensor q = heads(qkvc[0], h), k = heads(qkvc[1], h), v = heads(qkvc[2], h);
  Tensor qs_img = W(w, "img_attn.norm.query_norm.scale"), ks_img = W(w, "img_attn.norm.key_norm.scale");
  Tensor qs_txt = W(w, "txt_attn.norm.query_norm.scale"), ks_txt = W(w, "txt_attn.norm.key_norm.scale");
  Tensor qn = rmsnorm(q, qs_img), kn = rmsnorm(k, ks_img);
  qn.narrow(2, 0, T).copy_(rmsnorm(q.narrow(2, 0, T), qs_txt));
  kn.narrow(2, 0, T).copy_(rmsnorm(k.narrow(2, 0, T), ks_txt));
  Tensor ids = in.ids.to(at::kDouble).contiguous();
  qn = rope(qn.contiguous(), ids, cfg.axes_dim, cfg.theta);
  kn = rope(kn.contiguous(), ids, cfg.axes_dim, cfg.theta);
  Tensor attn = masked_attention(qn, kn, v, easycontrol_mask(T + L, lens));
  attn = attn.transpose(1, 2).reshape({B, N, H});
  // hidden = to_out[0](attn); then for each condition in turn hidden += w_n * proj_loras[n](hidden).
  Tensor proj = tok_lin(attn, "img_attn.proj", "txt_attn.proj");
  if (lora)
    for (size_t n = 0; n < lora->network_alphas.size(); ++n)
      proj = proj + easycontrol_lora(*lora, processor, "proj_loras", static_cast<int>(n), proj, type);
  Tensor y = x + per_token(2) * proj;
  Tensor yn = layernorm(y) * (1 + per_token(4)) + per_token(3);
  Tensor hdn = gelu_tanh(tok_lin(yn, "img_mlp.0", "txt_mlp.0"));
  y = y + per_token(5) * tok_lin(hdn, "img_mlp.2", "txt_mlp.2");
  std::vector<Tensor> out{y.narrow(1, T, L), y.narrow(1, 0, T)};
  int64_t off = T + L;
  for (int64_t l : lens) {
    out.push_back(y.narrow(1, off, l));
    off += l;
  }
  return out;
}

std::vector<at::Tensor> single_block(const FluxConfig& cfg, const TensorMap& w, const EasyControlLora* lora,
                                     int single_index, const at::Tensor& x_main, const std::vector<at::Tensor>& cond,
                                     const at::Tensor& vec, const at::Tensor& vec_cond, const at::Tensor& ids_in) {
  const int64_t B = x_main.size(0), S = x_main.size(1), H = cfg.hidden_size, M = cfg.mlp_hidden(),
                h = cfg.num_heads;
  std::vector<int64_t> lens;
  std::vector<Tensor> parts{x_main};
  for (const auto& c : cond) {
    lens.push_back(c.size(1));
    parts.push_back(c);
  }
  Tensor x = at::cat(parts, 1).to(at::kDouble);
  const int64_t N = x.size(1);
  std::vector<int> type(N, -1000);
  {
    int64_t off = S;
    for (size_t n = 0; n < lens.size(); ++n)
      for (int64_t i = 0; i < lens[n]; ++i) type[off++] = static_cast<int>(n);
  }
  auto mods = [&](const Tensor& v) {
    return lin(ref_silu(v.to(at::kDouble)), W(w, "modulation.lin.weight"), W(w, "modulation.lin.bias")).chunk(3, -1);
  };
  auto m = mods(vec);
  std::vector<Tensor> cm = cond.empty() ? std::vector<Tensor>() : mods(vec_cond);
  auto per_token = [&](int c) {
    Tensor out = at::empty({B, N, H}, x.options());
    for (int64_t i = 0; i < N; ++i) out.select(1, i).copy_(type[i] < 0 ? m[c] : cm[c]);
    return out;
  };
  Tensor xn = layernorm(x) * (1 + per_token(1)) + per_token(0);
  Tensor W1 = W(w, "linear1.weight"), b1 = W(w, "linear1.bias");
  // linear1 = [to_q | to_k | to_v | proj_mlp]; LoRA on q, k, v only.
  const std::string processor = "single_transformer_blocks." + std::to_string(single_index) + ".attn.processor";
  Tensor l1 = add_qkv_loras(lora, processor, lin(xn, W1, b1), xn, type, H);
  Tensor qkv = l1.narrow(2, 0, 3 * H), mlp = l1.narrow(2, 3 * H, M);
  auto qkvc = qkv.chunk(3, -1);
  Tensor q = rmsnorm(heads(qkvc[0], h), W(w, "norm.query_norm.scale"));
  Tensor k = rmsnorm(heads(qkvc[1], h), W(w, "norm.key_norm.scale"));
  Tensor v = heads(qkvc[2], h);
  Tensor ids = ids_in.to(at::kDouble).contiguous();
  q = rope(q.contiguous(), ids, cfg.axes_dim, cfg.theta);
  k = rope(k.contiguous(), ids, cfg.axes_dim, cfg.theta);
  Tensor attn = masked_attention(q, k, v, easycontrol_mask(S, lens)).transpose(1, 2).reshape({B, N, H});
  Tensor cat = at::cat({attn, gelu_tanh(mlp)}, -1);
  Tensor l2 = lin(cat, W(w, "linear2.weight"), W(w, "linear2.bias"));  // proj_out: no LoRA
  Tensor y = x + per_token(2) * l2;
  std::vector<Tensor> out{y.narrow(1, 0, S)};
  int64_t off = S;
  for (int64_t l : lens) {
    out.push_back(y.narrow(1, off, l));
    off += l;
  }
  return out;
}

}  // namespace fluxtrain::ref
