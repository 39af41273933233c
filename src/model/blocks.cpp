#include "model/blocks.h"

#include <cstdlib>
#include <optional>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include "model/condition_cache.h"
#include "model/gelu_linear.h"
#include "model/layers.h"
#include "model/lora_linear.h"
#include "model/recompute.h"

namespace fluxtrain {
namespace {

struct Heads {
  at::Tensor q, k, v;  // [B, heads, L, D]
};

// [B, L, 3H] -> q, k, v [B, heads, L, D], with FLUX's QK RMSNorm.
Heads split_heads(const at::Tensor& qkv, int64_t heads, const at::Tensor& q_scale, const at::Tensor& k_scale) {
  const int64_t B = qkv.size(0), L = qkv.size(1), D = qkv.size(2) / (3 * heads);
  at::Tensor t = qkv.view({B, L, 3, heads, D}).permute({2, 0, 3, 1, 4});
  at::Tensor v = t[2];
  return {rms_norm(t[0], q_scale).to(v.scalar_type()), rms_norm(t[1], k_scale).to(v.scalar_type()), v};
}

// The fused attention prologue (model/rope.h, qk_norm_rope) is used on CUDA for non-float64
// activations; CPU (and float64) runs keep the unfused ops below, with unchanged numerics.
bool fused_prologue(const at::Tensor& x) {
  return x.is_cuda() && x.scalar_type() != at::kDouble && fused_kernels_enabled();
}

// q, k (normalised, rotated by r) and v of the streams' tokens in order, through the fused
// kernels; the unfused ops when the kernels do not take these arguments.
Heads fused_heads(const std::vector<kernels::QkvSegment>& streams, int64_t heads, const Rope& r) {
  if (kernels::qk_norm_rope_cuda_supported(streams, heads, r.cos, r.sin)) {
    auto o = qk_norm_rope(streams, heads, r);
    return {o[0], o[1], o[2]};
  }
  std::vector<at::Tensor> q, k, v;
  for (const auto& s : streams) {
    Heads h = split_heads(s.qkv, heads, s.q_scale, s.k_scale);
    q.push_back(h.q), k.push_back(h.k), v.push_back(h.v);
  }
  auto cat = [](const std::vector<at::Tensor>& t) { return t.size() == 1 ? t[0] : at::cat(t, 2); };
  return {apply_rope(cat(q), r), apply_rope(cat(k), r), cat(v)};
}

// Whether a block with a condition stream runs its attention prologue as one qk_norm_rope_split
// over main and condition tokens (model/rope.h): the keys and values of all tokens come out as one
// tensor, so split_attention needs no concatenation. On CUDA the fused kernels, elsewhere their
// reference (the unfused op sequence); FLUXTRAIN_FUSED_KERNELS=0 or FLUXTRAIN_JOINT_PROLOGUE=0
// (an A/B switch, read once) keeps one prologue per stream and the concatenation.
bool split_prologue(const at::Tensor& cond) {
  static const bool enabled = [] {
    const char* e = std::getenv("FLUXTRAIN_JOINT_PROLOGUE");
    return !(e && e[0] == '0');
  }();
  return cond.defined() && enabled && fused_kernels_enabled();
}

// The rotary table of main then condition tokens (the model sets it once per forward).
Rope joint_rope(const BlockContext& c) {
  return c.rope_all.defined() ? c.rope_all : rope_cat({c.rope_main, c.rope_cond});
}

// One stream's q, k (normalised, rotated by r) and v: the fused prologue, or the unfused ops.
Heads stream_heads(const at::Tensor& qkv, int64_t heads, const at::Tensor& q_scale, const at::Tensor& k_scale,
                   const Rope& r, bool fused) {
  if (fused) return fused_heads({{qkv, q_scale, k_scale}}, heads, r);
  Heads h = split_heads(qkv, heads, q_scale, k_scale);
  h.q = apply_rope(h.q, r);
  h.k = apply_rope(h.k, r);
  return h;
}

at::Tensor merge_heads(const at::Tensor& o) {  // [B, heads, L, D] -> [B, L, heads*D]
  return o.transpose(1, 2).flatten(2);           // a view when o is token-major (below)
}

// [B, heads, L, D] operands whose memory is token-major ([B, L, heads, D]: the fused prologue's
// layout, kernels/qk_norm_rope.h) or head-major (contiguous) go to the attention kernels as
// they are; anything else is made contiguous.
bool token_major(const at::Tensor& t) { return t.transpose(1, 2).is_contiguous(); }
at::Tensor dense_heads(const at::Tensor& t) {
  return t.is_contiguous() || token_major(t) ? t : t.contiguous();
}

// Keys/values of two token ranges concatenated, token-major when both are.
at::Tensor cat_tokens(const at::Tensor& a, const at::Tensor& b) {
  if (token_major(a) && token_major(b)) return at::cat({a.transpose(1, 2), b.transpose(1, 2)}, 1).transpose(1, 2);
  return at::cat({a, b}, 2);
}

// A linear applied to the condition stream: condition n's tokens get condition n's adapters.
at::Tensor cond_linear(const BlockContext& c, const at::Tensor& xc, const TensorMap& w, const std::string& name,
                       int64_t row_begin = 0, int64_t row_end = -1) {
  const at::Tensor& W = w.at(name + ".weight");
  const at::Tensor ws = fp8_scale_of(w, name + ".weight");
  auto bi = w.find(name + ".bias");
  const at::Tensor b = bi == w.end() ? at::Tensor() : bi->second;
  if (c.cond_lens.size() == 1) return linear_with_lora(xc, W, b, c.lora, c.block, name, 0, row_begin, row_end, ws);
  std::vector<at::Tensor> parts;
  int64_t off = 0;
  for (size_t n = 0; n < c.cond_lens.size(); ++n) {
    parts.push_back(linear_with_lora(xc.narrow(1, off, c.cond_lens[n]), W, b, c.lora, c.block, name,
                                     static_cast<int>(n), row_begin, row_end, ws));
    off += c.cond_lens[n];
  }
  return at::cat(parts, 1);
}

at::Tensor main_linear(const BlockContext& c, const at::Tensor& x, const TensorMap& w, const std::string& name,
                       int64_t row_begin = 0, int64_t row_end = -1) {
  auto bi = w.find(name + ".bias");
  return linear_with_lora(x, w.at(name + ".weight"), bi == w.end() ? at::Tensor() : bi->second, c.lora, c.block,
                          name, -1, row_begin, row_end, fp8_scale_of(w, name + ".weight"));
}

// Modulation vectors: lin(silu(vec)) split into n chunks of [B, 1, H].
std::vector<at::Tensor> modulation(const at::Tensor& vec, const TensorMap& w, const std::string& name, int64_t n) {
  return linear(at::silu(vec), w, name).unsqueeze(1).chunk(n, -1);
}

// The modulations of the main stream (vec) and of the condition stream (vec_cond, the timestep-0
// embedding) through the same weight, in one product: the weight (113 MB for a double block's
// img_mod at FLUX size) is read once, not twice, by a GEMM of 2B rows.
std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> modulation_pair(const at::Tensor& vec,
                                                                           const at::Tensor& vec_cond,
                                                                           const TensorMap& w,
                                                                           const std::string& name, int64_t n) {
  const int64_t B = vec.size(0);
  at::Tensor both = linear(at::silu(at::cat({vec, vec_cond}, 0)), w, name).unsqueeze(1);
  return {both.narrow(0, 0, B).chunk(n, -1), both.narrow(0, B, B).chunk(n, -1)};
}

// Whether a frozen linear runs as a plain product for these tokens: no adapter of theirs (the
// main stream's, or any condition's) is on it. (Its weight may be in fp8 stored form: gelu_linear
// multiplies that as fp8.)
bool plain_frozen(const BlockContext& c, const std::string& linear, bool cond_stream) {
  if (!c.lora) return true;
  const int first = cond_stream ? 0 : -1, end = cond_stream ? static_cast<int>(c.cond_lens.size()) : 0;
  for (int n = first; n < end; ++n)
    if (!c.lora->find(c.block, linear, n).empty()) return false;
  return true;
}

// Whether no adapter of these tokens adds to output columns [begin, end) of a linear.
bool unadapted_columns(const BlockContext& c, const std::string& linear, int64_t begin, int64_t end,
                       bool cond_stream) {
  if (!c.lora) return true;
  const int first = cond_stream ? 0 : -1, last = cond_stream ? static_cast<int>(c.cond_lens.size()) : 0;
  for (int n = first; n < last; ++n)
    for (const LoraAdapter* a : c.lora->find(c.block, linear, n))
      if (a->out_begin < end && a->out_end > begin) return false;
  return true;
}

// FLUXTRAIN_MERGE_COND_GEMMS=0 keeps a single block's main and condition rows in separate GEMMs
// (single_block says when they share one; read once).
bool merge_cond_gemms_enabled() {
  static const bool enabled = [] {
    const char* e = std::getenv("FLUXTRAIN_MERGE_COND_GEMMS");
    return !(e && e[0] == '0');
  }();
  return enabled;
}

// In a block's recomputation (model/recompute.h) the linear that feeds a gated residual is left
// uncomputed (its backward only) when it is a plain frozen product and its gate needs no
// gradient: then nothing reads its output values. Outside a recomputation it returns before
// building any name.
bool skip_terminal(const BlockContext& c, const at::Tensor& gate, const char* linear, bool cond_stream) {
  if (!replaying_recompute() || gate.requires_grad()) return false;
  return plain_frozen(c, linear, cond_stream);
}

// The bias of a linear, undefined when it has none.
at::Tensor bias_of(const TensorMap& w, const std::string& linear) {
  auto bi = w.find(linear + ".bias");
  return bi == w.end() ? at::Tensor() : bi->second;
}

// The main stream's adapters on a linear in the form gelu_linear takes (input-side, all rows);
// nullopt when one of them reads the linear's output (then linear_with_lora applies them).
// FLUXTRAIN_GELU_LINEAR_ADAPTERS=0 (an A/B switch, read once) gives nullopt for adapted linears:
// cat(inputs, GELU(pre)) through lora_linear, the path before session 16.
std::optional<InputAdapters> main_input_adapters(const BlockContext& c, const std::string& linear) {
  static const bool enabled = [] {
    const char* e = std::getenv("FLUXTRAIN_GELU_LINEAR_ADAPTERS");
    return !(e && e[0] == '0');
  }();
  if (!c.lora) return InputAdapters{};
  const std::vector<const LoraAdapter*> ads = c.lora->find(c.block, linear, -1);
  for (const LoraAdapter* ad : ads)
    if (ad->on_output || !enabled) return std::nullopt;
  return input_adapters(ads);
}

// Whether an MLP's up projection (output columns [begin, end) of linear up) and its down
// projection run as one fp8_gelu_mlp node (model/gelu_linear.h): both weights in the fp8 stored
// form and no adapter of these tokens on those columns or on the down projection.
bool fp8_mlp(const BlockContext& c, const TensorMap& w, const std::string& up, int64_t begin, int64_t end,
             const std::string& down, bool cond_stream) {
  return fp8_gelu_mlp_enabled() && w.at(up + ".weight").scalar_type() == at::kFloat8_e4m3fn &&
         w.at(down + ".weight").scalar_type() == at::kFloat8_e4m3fn && unadapted_columns(c, up, begin, end, cond_stream) &&
         plain_frozen(c, down, cond_stream);
}

// fp8_gelu_mlp over columns [begin, begin + n) of linear up (its weight rows, bias and scales).
at::Tensor fp8_mlp_of(const TensorMap& w, const at::Tensor& x, const std::string& up, int64_t begin, int64_t n,
                      const std::vector<at::Tensor>& xs, const std::string& down, bool compute_output) {
  const at::Tensor& Wu = w.at(up + ".weight");
  const at::Tensor bu = bias_of(w, up);
  const bool whole = begin == 0 && n == Wu.size(0);
  return fp8_gelu_mlp(x, whole ? Wu : Wu.narrow(0, begin, n), bu.defined() && !whole ? bu.narrow(0, begin, n) : bu,
                      fp8_scale_rows(fp8_scale_of(w, up + ".weight"), begin, n), xs, w.at(down + ".weight"),
                      bias_of(w, down), fp8_scale_of(w, down + ".weight"), compute_output);
}

// The MLP: GELU of the up projection, then the down projection. Both frozen in fp8 and
// unadapted: one fp8_gelu_mlp node. Otherwise a plain frozen down projection, or one with the
// main stream's input-side adapters, runs as gelu_linear (model/gelu_linear.h: no concatenation,
// GELU's backward on a dense gradient or in the GEMM's epilogue); skip_out: it is only given a
// backward (skip_terminal).
template <typename Lin>
at::Tensor mlp(const BlockContext& c, const at::Tensor& x, const TensorMap& w, const std::string& prefix, Lin&& lin,
               bool cond_stream, bool skip_out) {
  const std::string up = prefix + ".0";
  const int64_t M = w.at(up + ".weight").size(0);
  if (fp8_mlp(c, w, up, 0, M, prefix + ".2", cond_stream)) return fp8_mlp_of(w, x, up, 0, M, {}, prefix + ".2", !skip_out);
  at::Tensor pre = lin(x, up);
  const std::string down = prefix + ".2";
  if (skip_out || plain_frozen(c, down, cond_stream))
    return gelu_linear({}, pre, w.at(down + ".weight"), bias_of(w, down), !skip_out, fp8_scale_of(w, down + ".weight"));
  if (!cond_stream)
    if (const auto a = main_input_adapters(c, down))
      return gelu_linear({}, pre, w.at(down + ".weight"), bias_of(w, down), true, fp8_scale_of(w, down + ".weight"),
                         *a);
  return lin(at::gelu(pre, "tanh"), down);
}

// linear2 of a single block applied to cat(attn, act) without materialising the concatenation:
// attn @ W[:, :H]^T + b, then act @ W[:, H:]^T accumulated into it by the same GEMM (addmm).
// Falls back to the concatenated input when an adapter targets linear2 for these tokens.
at::Tensor single_linear2(const BlockContext& c, const TensorMap& w, const at::Tensor& attn, const at::Tensor& act,
                          int cond) {
  const bool adapted = c.lora && !c.lora->find(c.block, "linear2", cond).empty();
  if (adapted) {
    at::Tensor in = at::cat({attn, act}, -1);
    return cond >= 0 ? cond_linear(c, in, w, "linear2") : main_linear(c, in, w, "linear2");
  }
  const at::Tensor& W = w.at("linear2.weight");
  const int64_t H = attn.size(-1);
  if (W.scalar_type() == at::kFloat8_e4m3fn) {
    // fp8 stored form (--fp8_matmul): two fp8 products on the column halves of the codes (the
    // per-output-channel scales apply to both), summed; the fp8 GEMM takes no accumulator.
    const at::Tensor ws = fp8_scale_of(w, "linear2.weight");
    return frozen_linear(attn, W.narrow(1, 0, H), w.at("linear2.bias"), ws) +
           frozen_linear(act, W.narrow(1, H, W.size(1) - H), at::Tensor(), ws);
  }
  at::Tensor y = at::linear(attn, W.narrow(1, 0, H), w.at("linear2.bias"));
  auto sz = y.sizes().vec();
  return at::addmm(y.reshape({-1, sz.back()}), act.reshape({-1, act.size(-1)}), W.narrow(1, H, W.size(1) - H).t())
      .view(sz);
}

// A single block's linear2 over [attention, GELU(mlp_pre)] for the main stream (cond_stream
// false) or the condition stream: gelu_linear when it is a plain frozen product (only its
// backward in a replay, skip_terminal) or carries the main stream's input-side adapters,
// single_linear2 otherwise.
at::Tensor linear2_of(const BlockContext& c, const TensorMap& w, const at::Tensor& attn, const at::Tensor& mlp_pre,
                      const at::Tensor& gate, bool cond_stream) {
  const bool skip = skip_terminal(c, gate, "linear2", cond_stream);
  if (skip || plain_frozen(c, "linear2", cond_stream))
    return gelu_linear({attn}, mlp_pre, w.at("linear2.weight"), bias_of(w, "linear2"), !skip,
                       fp8_scale_of(w, "linear2.weight"));
  if (!cond_stream)
    if (const auto a = main_input_adapters(c, "linear2"))
      return gelu_linear({attn}, mlp_pre, w.at("linear2.weight"), bias_of(w, "linear2"), true,
                         fp8_scale_of(w, "linear2.weight"), *a);
  return single_linear2(c, w, attn, at::gelu(mlp_pre, "tanh"), cond_stream ? 0 : -1);
}

// Strides of a dense [B, heads, L, D] tensor laid out as [B, L, heads, D] (merged heads): the
// layout of the output gradient when it comes back through merge_heads from a dense [B, L, H].
std::vector<int64_t> merged_heads_strides(at::IntArrayRef sizes) {
  const int64_t h = sizes[1], L = sizes[2], D = sizes[3];
  return {L * h * D, D, h * D, 1};
}

// Every stride compared, size-1 dimensions too: the cached graph keeps all of them.
bool same_layout(const at::Tensor& t, const std::vector<int64_t>& strides) {
  return t.strides().vec() == strides;
}

// Whether t has these strides in every dimension of more than one element: then it addresses the
// same elements as a tensor with exactly these strides.
bool same_layout_where_it_matters(const at::Tensor& t, const std::vector<int64_t>& strides) {
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != strides[static_cast<size_t>(d)]) return false;
  return true;
}

// at::scaled_dot_product_attention with its output gradient always in the merged-heads layout.
// LibTorch's cuDNN attention keys its cached backward graph by the shapes and strides of q, k and v
// only, yet builds the graph with the strides of the output gradient it first sees (ATen's
// cudnn/MHA.cpp with cuDNN >= 9.5.1). Two calls with equal q, k, v but differently strided output
// gradients then share a graph that reads the second gradient with the first one's strides, out
// of bounds: "mha_graph.execute ... is_good()" or an illegal memory access. That is what failed
// in plain-LoRA mode in sessions 6-7, then blamed on cuDNN (docs/benchmarks.md, session 10): a
// single block whose linear2 is adapted takes its attention output through a cat, so its gradient
// comes back as a slice with a row stride of 5H, while the double blocks' calls of the same shape
// get a dense gradient (row stride H). Normalising the gradient costs one copy where it is not
// already dense, and makes the graph the same for every call. A gradient that differs only in the
// stride of a size-1 dimension (at batch size 1, a slice of the rows of a larger [1, L, H]
// gradient: a single block's merged linear2, session 13) is given those strides as a view of the
// same elements instead: no copy.
at::Tensor merged_heads_grad(const at::Tensor& g) {
  if (!g.is_cuda() || g.dim() != 4) return g;
  auto strides = merged_heads_strides(g.sizes());
  if (same_layout(g, strides)) return g;
  if (same_layout_where_it_matters(g, strides)) return g.as_strided(g.sizes(), strides, g.storage_offset());
  return at::empty_strided(g.sizes(), strides, g.options()).copy_(g);
}

// In a checkpointed block the call is recorded in the first forward and replayed in the
// recomputation (model/recompute.h), with the same gradient layout rule.
at::Tensor sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  at::Tensor o = recorded_attention(q, k, v, &merged_heads_grad);
  if (o.defined()) return o;
  o = at::scaled_dot_product_attention(q, k, v);
  if (o.requires_grad() && o.is_cuda() && o.dim() == 4) o.register_hook(&merged_heads_grad);
  return o;
}

// Whether every adapter of condition n on a linear reads its input (none is an output-side one).
bool input_side_only(const BlockContext& c, const std::string& linear, int n) {
  if (!c.lora) return true;
  for (const LoraAdapter* a : c.lora->find(c.block, linear, n))
    if (a->on_output) return false;
  return true;
}

// The qkv columns of a single block's linear1 over xin = cat(main rows, condition rows) at batch
// size 1, as one GEMM: condition 0's adapters add to its rows only (lora_linear's row range; cn
// holds those rows' values, what backward keeps). The main rows have no adapter there
// (single_block checks).
at::Tensor joint_qkv(const BlockContext& c, const TensorMap& w, const at::Tensor& xin, const at::Tensor& cn,
                     int64_t Lm) {
  const int64_t n3 = 3 * c.cfg->hidden_size;
  const at::Tensor W = w.at("linear1.weight").narrow(0, 0, n3);
  const at::Tensor b1 = bias_of(w, "linear1");
  const at::Tensor b = b1.defined() ? b1.narrow(0, 0, n3) : b1;
  const InputAdapters a = c.lora ? input_adapters(c.lora->find(c.block, "linear1", 0)) : InputAdapters{};
  const at::Tensor ws = fp8_scale_rows(fp8_scale_of(w, "linear1.weight"), 0, n3);
  if (a.empty()) return frozen_linear(xin, W, b, ws);
  return lora_linear(xin, W, b, a.downs, a.ups, a.offsets, a.scales, ws, Lm, Lm + cn.size(1), cn);
}

}  // namespace

void configure_attention_backends() {
  const char* e = std::getenv("FLUXTRAIN_SDP_CUDNN");
  const std::string v = e ? e : "auto";
  at::globalContext().setSDPUseCuDNN(v != "0");
}

at::Tensor split_attention(const at::Tensor& q_main, const at::Tensor& k_main, const at::Tensor& v_main,
                           const at::Tensor& q_cond, const at::Tensor& k_cond, const at::Tensor& v_cond,
                           const std::vector<int64_t>& cond_lens, at::Tensor* out_cond) {
  // Dense [B, h, L, D] operands (dense_heads): fused attention backends (cuDNN in particular)
  // want them.
  if (!k_cond.defined()) return merge_heads(sdpa(dense_heads(q_main), dense_heads(k_main), dense_heads(v_main)));
  return joint_split_attention(q_main, cat_tokens(k_main, k_cond), cat_tokens(v_main, v_cond), q_cond, k_cond, v_cond,
                               cond_lens, out_cond);
}

at::Tensor joint_split_attention(const at::Tensor& q_main, const at::Tensor& k_all, const at::Tensor& v_all,
                                 const at::Tensor& q_cond, const at::Tensor& k_cond, const at::Tensor& v_cond,
                                 const std::vector<int64_t>& cond_lens, at::Tensor* out_cond) {
  at::Tensor om = merge_heads(sdpa(dense_heads(q_main), dense_heads(k_all), dense_heads(v_all)));
  if (out_cond && q_cond.defined()) {
    bool equal = true;
    for (int64_t l : cond_lens) equal = equal && l == cond_lens[0];
    const int64_t n = static_cast<int64_t>(cond_lens.size());
    if (equal && n > 1) {
      // [B, h, n*Lc, D] -> [B*n, h, Lc, D]: all conditions in one batched call.
      auto fold = [&](const at::Tensor& t) {
        const int64_t B = t.size(0), h = t.size(1), D = t.size(3);
        return t.reshape({B, h, n, cond_lens[0], D}).transpose(1, 2).reshape({B * n, h, cond_lens[0], D}).contiguous();
      };
      at::Tensor oc = sdpa(fold(q_cond), fold(k_cond), fold(v_cond));
      const int64_t B = q_cond.size(0), h = q_cond.size(1), D = q_cond.size(3);
      oc = oc.view({B, n, h, cond_lens[0], D}).transpose(1, 2).reshape({B, h, n * cond_lens[0], D});
      *out_cond = merge_heads(oc);
    } else {
      // Each condition's tokens: split, not narrow (a narrow's backward zero-fills a full-size
      // gradient and copies its slice in: 2.2 ms per step at 512/1024/128 with one condition,
      // session 13), and the tensors themselves when there is one condition.
      auto per_cond = [&](const at::Tensor& t) {
        return cond_lens.size() == 1 ? std::vector<at::Tensor>{t} : at::split_with_sizes(t, cond_lens, 2);
      };
      const auto qs = per_cond(q_cond), ks = per_cond(k_cond), vs = per_cond(v_cond);
      std::vector<at::Tensor> parts;
      for (size_t n = 0; n < cond_lens.size(); ++n)
        parts.push_back(merge_heads(sdpa(dense_heads(qs[n]), dense_heads(ks[n]), dense_heads(vs[n]))));
      *out_cond = parts.size() == 1 ? parts[0] : at::cat(parts, 1);
    }
  }
  return om;
}

std::vector<at::Tensor> double_block(const BlockContext& c, const TensorMap& w, const at::Tensor& img,
                                     const at::Tensor& txt, const at::Tensor& cond, const at::Tensor& vec,
                                     const at::Tensor& vec_cond) {
  const int64_t heads = c.cfg->num_heads, T = txt.size(1);
  const bool has_cond = cond.defined();
  auto img_lin = [&](const at::Tensor& x, const std::string& n) { return main_linear(c, x, w, n); };
  auto cond_lin = [&](const at::Tensor& x, const std::string& n) { return cond_linear(c, x, w, n); };

  std::vector<at::Tensor> im, cm;  // cm: the condition stream's (image-stream weights, timestep-0 embedding)
  if (has_cond)
    std::tie(im, cm) = modulation_pair(vec, vec_cond, w, "img_mod.lin", 6);
  else
    im = modulation(vec, w, "img_mod.lin", 6);
  auto tm = modulation(vec, w, "txt_mod.lin", 6);
  const at::Tensor& iqs = w.at("img_attn.norm.query_norm.scale");
  const at::Tensor& iks = w.at("img_attn.norm.key_norm.scale");
  const at::Tensor& tqs = w.at("txt_attn.norm.query_norm.scale");
  const at::Tensor& tks = w.at("txt_attn.norm.key_norm.scale");
  const bool fused = fused_prologue(img);
  // Each stream's input feeds its norm and its residual (modulate_residual: one backward node).
  const auto [img_r, img_n] = modulate_residual(img, im[0], im[1]);
  const auto [txt_r, txt_n] = modulate_residual(txt, tm[0], tm[1]);
  at::Tensor q, k, v;
  Heads ch;
  at::Tensor cond_r;
  const bool joint = split_prologue(cond);
  if (joint) {
    // Text, image and condition tokens through one prologue (condition tokens with the image
    // stream's norms): q of text+image, k and v of all tokens, and the condition's own q, k, v.
    at::Tensor iqkv = img_lin(img_n, "img_attn.qkv");
    at::Tensor tqkv = main_linear(c, txt_n, w, "txt_attn.qkv");
    const auto rn = modulate_residual(cond, cm[0], cm[1]);
    cond_r = rn[0];
    at::Tensor cqkv = cond_lin(rn[1], "img_attn.qkv");
    const SplitQkv s = qk_norm_rope_split({{tqkv, tqs, tks}, {iqkv, iqs, iks}, {cqkv, iqs, iks}}, heads,
                                          joint_rope(c), T + img.size(1));
    q = s.q_main, k = s.k_all, v = s.v_all;
    ch = {s.q_cond, s.k_cond, s.v_cond};
    if (c.record) c.record->record(c.block, ch.k, ch.v);
  } else if (fused) {
    // Text and image qkv written straight into the concatenated q, k, v (no cat).
    at::Tensor iqkv = img_lin(img_n, "img_attn.qkv");
    at::Tensor tqkv = main_linear(c, txt_n, w, "txt_attn.qkv");
    Heads h = fused_heads({{tqkv, tqs, tks}, {iqkv, iqs, iks}}, heads, c.rope_main);
    q = h.q, k = h.k, v = h.v;
  } else {
    Heads ih = split_heads(img_lin(img_n, "img_attn.qkv"), heads, iqs, iks);
    Heads th = split_heads(main_linear(c, txt_n, w, "txt_attn.qkv"), heads, tqs, tks);
    q = apply_rope(at::cat({th.q, ih.q}, 2), c.rope_main);
    k = apply_rope(at::cat({th.k, ih.k}, 2), c.rope_main);
    v = at::cat({th.v, ih.v}, 2);
  }

  if (has_cond && !joint) {
    const auto rn = modulate_residual(cond, cm[0], cm[1]);
    cond_r = rn[0];
    ch = stream_heads(cond_lin(rn[1], "img_attn.qkv"), heads, iqs, iks, c.rope_cond, fused);
    if (c.record) c.record->record(c.block, ch.k, ch.v);
  } else if (c.cached_k.defined()) {
    ch.k = c.cached_k;
    ch.v = c.cached_v;
  }
  at::Tensor oc;
  at::Tensor om = joint ? joint_split_attention(q, k, v, ch.q, ch.k, ch.v, c.cond_lens, &oc)
                        : split_attention(q, k, v, ch.q, ch.k, ch.v, c.cond_lens, has_cond ? &oc : nullptr);

  // split, not two narrows: its backward is one cat of the two gradients (narrow's zero-fills a
  // full-size gradient per slice and adds them).
  const auto parts = at::split_with_sizes(om, {T, om.size(1) - T}, 1);
  const at::Tensor& txt_a = parts[0];
  const at::Tensor& img_a = parts[1];
  // Attention's gated residual, then the MLP's on the norm of its result.
  auto mlp_residual = [&](const at::Tensor& h, const std::vector<at::Tensor>& mod, const char* prefix, auto&& lin,
                          bool cond_stream) {
    const auto [r, n] = modulate_residual(h, mod[3], mod[4]);
    const std::string down = std::string(prefix) + ".2";
    return gated_residual(r, mod[5], mlp(c, n, w, prefix, lin, cond_stream,
                                      skip_terminal(c, mod[5], down.c_str(), cond_stream)));
  };
  auto txt_lin = [&](const at::Tensor& x, const std::string& n) { return main_linear(c, x, w, n); };
  at::Tensor img_out = mlp_residual(gated_residual(img_r, im[2], img_lin(img_a, "img_attn.proj")), im, "img_mlp",
                                    img_lin, false);
  at::Tensor txt_out = mlp_residual(gated_residual(txt_r, tm[2], main_linear(c, txt_a, w, "txt_attn.proj")), tm,
                                    "txt_mlp", txt_lin, false);
  at::Tensor cond_out;
  if (has_cond)
    cond_out =
        mlp_residual(gated_residual(cond_r, cm[2], cond_lin(oc, "img_attn.proj")), cm, "img_mlp", cond_lin, true);
  return {img_out, txt_out, cond_out};
}

std::vector<at::Tensor> single_block(const BlockContext& c, const TensorMap& w, const at::Tensor& x,
                                     const at::Tensor& cond, const at::Tensor& vec, const at::Tensor& vec_cond) {
  const int64_t heads = c.cfg->num_heads, H = c.cfg->hidden_size, M = c.cfg->mlp_hidden(), Lm = x.size(1);
  const bool has_cond = cond.defined();
  const at::Tensor& qs = w.at("norm.query_norm.scale");
  const at::Tensor& ks = w.at("norm.key_norm.scale");

  std::vector<at::Tensor> m, cm;  // cm: the condition stream's
  if (has_cond)
    std::tie(m, cm) = modulation_pair(vec, vec_cond, w, "modulation.lin", 3);
  else
    m = modulation(vec, w, "modulation.lin", 3);
  const auto [x_r, xn] = modulate_residual(x, m[0], m[1]);  // x feeds its norm and its residual
  // After the last block only the noise tokens are read: the condition stream's own attention
  // output and MLP would be discarded, so they are not computed (its keys/values still are).
  const bool cond_out_needed = has_cond && !c.last_block;
  at::Tensor cond_r, cn;  // the condition stream's residual input and normed rows
  if (cond_out_needed) {
    const auto rn = modulate_residual(cond, cm[0], cm[1]);
    cond_r = rn[0], cn = rn[1];
  } else if (has_cond) {
    cn = modulate(cond, cm[0], cm[1]);
  }
  // The main and condition rows share every weight of the block. Where both streams' MLP up
  // projection and linear2 are plain frozen products, each runs as one GEMM over both streams'
  // rows (main, then condition tokens): one product of 5632 rows instead of 4608 + 1024 at
  // 512/1024/128, which cuBLAS runs at a better rate (bench/probe_gemm_shapes.py: 3.73 against
  // 4.10 ms per single block for the four weights, forward and backward; docs/benchmarks.md,
  // session 12). Cost: the two inputs are concatenated (normed rows, attention outputs) and the
  // output's gradient is joined again in backward.
  const bool merged = cond_out_needed && merge_cond_gemms_enabled() &&
                      unadapted_columns(c, "linear1", 3 * H, 3 * H + M, false) &&
                      unadapted_columns(c, "linear1", 3 * H, 3 * H + M, true) &&
                      plain_frozen(c, "linear2", false) && plain_frozen(c, "linear2", true) &&
                      skip_terminal(c, m[2], "linear2", false) == skip_terminal(c, cm[2], "linear2", true);
  const at::Tensor xin = merged ? at::cat({xn, cn}, 1) : at::Tensor();  // the merged GEMMs' rows
  const bool joint = split_prologue(cond);
  // The qkv columns of linear1 over both streams' rows too (batch 1, one condition, the main rows
  // unadapted there): the condition's adapters add to its rows only (joint_qkv).
  const bool qkv_merged = joint && merged && x.size(0) == 1 && c.cond_lens.size() == 1 &&
                          unadapted_columns(c, "linear1", 0, 3 * H, false) && input_side_only(c, "linear1", 0);

  Heads h, ch;
  if (joint) {
    // Main and condition tokens through one prologue: q of the main tokens, k and v of all
    // tokens, and the condition's own q, k, v (model/rope.h, qk_norm_rope_split).
    const SplitQkv s =
        qkv_merged ? qk_norm_rope_split({{joint_qkv(c, w, xin, cn, Lm), qs, ks}}, heads, joint_rope(c), Lm)
                   : qk_norm_rope_split({{main_linear(c, xn, w, "linear1", 0, 3 * H), qs, ks},
                                         {cond_linear(c, cn, w, "linear1", 0, 3 * H), qs, ks}},
                                        heads, joint_rope(c), Lm);
    h = {s.q_main, s.k_all, s.v_all};
    ch = {s.q_cond, s.k_cond, s.v_cond};
  } else {
    const bool fused = fused_prologue(x);
    h = stream_heads(main_linear(c, xn, w, "linear1", 0, 3 * H), heads, qs, ks, c.rope_main, fused);
    if (has_cond) {
      ch = stream_heads(cond_linear(c, cn, w, "linear1", 0, 3 * H), heads, qs, ks, c.rope_cond, fused);
    } else if (c.cached_k.defined()) {
      ch.k = c.cached_k;
      ch.v = c.cached_v;
    }
  }
  if (!cond_out_needed) ch.q = at::Tensor();  // the condition's queries only feed its own output
  if (has_cond && c.record) c.record->record(c.block, ch.k, ch.v);
  // The main stream's MLP as one fp8 node (fp8_mlp), when the block's rows are not merged.
  const bool main_fp8_mlp = !merged && fp8_mlp(c, w, "linear1", 3 * H, 3 * H + M, "linear2", false);
  at::Tensor mlp_in = merged || main_fp8_mlp ? at::Tensor() : main_linear(c, xn, w, "linear1", 3 * H, 3 * H + M);
  at::Tensor oc;
  at::Tensor* oc_out = cond_out_needed ? &oc : nullptr;
  at::Tensor om = joint ? joint_split_attention(h.q, h.k, h.v, ch.q, ch.k, ch.v, c.cond_lens, oc_out)
                        : split_attention(h.q, h.k, h.v, ch.q, ch.k, ch.v, c.cond_lens, oc_out);
  if (merged) {
    const bool skip = skip_terminal(c, m[2], "linear2", false);
    at::Tensor y;
    if (fp8_mlp(c, w, "linear1", 3 * H, 3 * H + M, "linear2", false)) {  // (merged: no adapters there)
      y = fp8_mlp_of(w, xin, "linear1", 3 * H, M, {at::cat({om, oc}, 1)}, "linear2", !skip);
    } else {
      const at::Tensor b1 = bias_of(w, "linear1");
      at::Tensor pre = frozen_linear(xin, w.at("linear1.weight").narrow(0, 3 * H, M),
                                     b1.defined() ? b1.narrow(0, 3 * H, M) : b1,
                                     fp8_scale_rows(fp8_scale_of(w, "linear1.weight"), 3 * H, M));
      y = gelu_linear({at::cat({om, oc}, 1)}, pre, w.at("linear2.weight"), bias_of(w, "linear2"), !skip,
                      fp8_scale_of(w, "linear2.weight"));
    }
    const auto ys = at::split_with_sizes(y, {Lm, y.size(1) - Lm}, 1);
    return {gated_residual(x_r, m[2], ys[0]), gated_residual(cond_r, cm[2], ys[1])};
  }
  at::Tensor x_out =
      gated_residual(x_r, m[2],
                     main_fp8_mlp ? fp8_mlp_of(w, xn, "linear1", 3 * H, M, {om}, "linear2",
                                               !skip_terminal(c, m[2], "linear2", false))
                                  : linear2_of(c, w, om, mlp_in, m[2], false));
  at::Tensor cond_out = cond;
  if (cond_out_needed)
    cond_out = gated_residual(cond_r, cm[2], linear2_of(c, w, oc, cond_linear(c, cn, w, "linear1", 3 * H, 3 * H + M),
                                                   cm[2], true));
  return {x_out, cond_out};
}

}  // namespace fluxtrain
