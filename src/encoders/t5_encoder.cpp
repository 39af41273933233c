#include "encoders/t5_encoder.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/error.h"
#include "encoders/encoder_ops.h"
#include "encoders/hf_weights.h"
#include "model/block_runner.h"

namespace fluxtrain {
namespace {

const char* kProjs[] = {"q", "k", "v", "o"};
const char* kRelBias = "layer.0.SelfAttention.relative_attention_bias.weight";

std::string block_prefix_t5(int64_t i) { return "encoder.block." + std::to_string(i) + "."; }

bool low_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// T5's RMS norm: x / sqrt(mean(x^2) + eps) with the mean in float32 (float64 for float64 inputs),
// cast to the weight's dtype when that is half precision, then times the weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor var = x.to(encoder_ops::accum_dtype(x)).pow(2).mean(-1, /*keepdim=*/true);
  at::Tensor h = x * at::rsqrt(var + eps);
  if (low_precision(weight.scalar_type())) h = h.to(weight.scalar_type());
  return weight * h;
}

}  // namespace

at::Tensor t5_relative_position_bucket(const at::Tensor& rel, int64_t num_buckets, int64_t max_distance) {
  // Bidirectional: half of the buckets for keys after the query, half for keys before. In each
  // half, exact buckets for small distances and logarithmic ones up to max_distance.
  const int64_t half = num_buckets / 2;
  at::Tensor buckets = rel.gt(0).to(at::kLong) * half;
  const at::Tensor n = rel.abs();
  const int64_t max_exact = half / 2;
  const at::Tensor is_small = n.lt(max_exact);
  at::Tensor large = (at::log(n.to(at::kFloat) / static_cast<float>(max_exact)) /
                      std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact)) *
                      static_cast<double>(half - max_exact))
                         .to(at::kLong) +
                     max_exact;
  large = at::minimum(large, at::full_like(large, half - 1));
  return buckets + at::where(is_small, n, large);
}

std::map<std::string, std::vector<int64_t>> T5Encoder::expected_shapes(const T5EncoderConfig& c) {
  const int64_t D = c.d_model, I = c.inner_dim(), F = c.d_ff;
  std::map<std::string, std::vector<int64_t>> s;
  s["shared.weight"] = {c.vocab_size, D};
  s["encoder.final_layer_norm.weight"] = {D};
  s[block_prefix_t5(0) + kRelBias] = {c.relative_attention_num_buckets, c.num_heads};
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = block_prefix_t5(i);
    s[p + "layer.0.SelfAttention.q.weight"] = {I, D};
    s[p + "layer.0.SelfAttention.k.weight"] = {I, D};
    s[p + "layer.0.SelfAttention.v.weight"] = {I, D};
    s[p + "layer.0.SelfAttention.o.weight"] = {D, I};
    s[p + "layer.0.layer_norm.weight"] = {D};
    s[p + "layer.1.layer_norm.weight"] = {D};
    if (c.gated()) {
      s[p + "layer.1.DenseReluDense.wi_0.weight"] = {F, D};
      s[p + "layer.1.DenseReluDense.wi_1.weight"] = {F, D};
    } else {
      s[p + "layer.1.DenseReluDense.wi.weight"] = {F, D};
    }
    s[p + "layer.1.DenseReluDense.wo.weight"] = {D, F};
  }
  return s;
}

std::vector<TextLoraTarget> T5Encoder::lora_targets(const T5EncoderConfig& c) {
  std::vector<TextLoraTarget> t;
  for (int64_t i = 0; i < c.num_layers; ++i)
    for (const char* proj : kProjs) {
      const bool out = std::string(proj) == "o";
      t.push_back({block_prefix_t5(i) + "layer.0.SelfAttention." + proj, static_cast<int>(i), proj,
                   out ? c.inner_dim() : c.d_model, out ? c.d_model : c.inner_dim()});
    }
  return t;
}

T5Encoder::T5Encoder(const T5EncoderConfig& cfg, const TensorMap& hf_in, const std::string& where)
    : cfg_(cfg), dtype_(at::kFloat) {
  // The embedding is tied: files hold shared.weight, encoder.embed_tokens.weight or both.
  TensorMap hf = hf_in;
  if (!hf.count("shared.weight") && hf.count("encoder.embed_tokens.weight"))
    hf["shared.weight"] = hf["encoder.embed_tokens.weight"];
  hf.erase("encoder.embed_tokens.weight");
  check_weights(hf, expected_shapes(cfg), where);
  w_.layers_.resize(static_cast<size_t>(cfg.num_layers));
  for (const auto& [name, t] : hf) {
    bool in_layer = false;
    for (int64_t i = 0; i < cfg.num_layers && !in_layer; ++i) {
      const std::string p = block_prefix_t5(i);
      if (name.compare(0, p.size(), p) == 0) {
        w_.layers_[static_cast<size_t>(i)][name.substr(p.size())] = t;
        in_layer = true;
      }
    }
    if (!in_layer) w_.globals_[name] = t;
  }
  // Layer 0 owns the relative position bias; every layer uses it.
  w_.globals_["relative_attention_bias"] = w_.layers_[0].at(kRelBias);
  w_.layers_[0].erase(kRelBias);
  dtype_ = hf.at("shared.weight").scalar_type();
}

std::unique_ptr<T5Encoder> T5Encoder::load_stored(const std::string& dir) {
  const T5EncoderConfig cfg = T5EncoderConfig::from_json(read_hf_config(dir), dir + "/config.json");
  return std::make_unique<T5Encoder>(cfg, load_hf_weights(dir), dir);
}

std::unique_ptr<T5Encoder> T5Encoder::load(const std::string& dir, at::ScalarType dtype, at::Device device) {
  auto m = load_stored(dir);
  m->to(dtype, device);
  return m;
}

EncoderLayerWeights T5Encoder::take_weights() {
  check_input(!provider_, "T5 encoder: its weights were already handed to a layer provider");
  EncoderLayerWeights w = std::move(w_);
  w_ = EncoderLayerWeights();
  return w;
}

void T5Encoder::use_layer_provider(std::unique_ptr<BlockWeights> provider, at::ScalarType dtype, at::Device device,
                                   int64_t device_bytes) {
  check_input(provider && provider->num_blocks() == cfg_.num_layers,
              "T5 encoder: a layer provider must hold " + std::to_string(cfg_.num_layers) + " layers");
  provider_ = std::move(provider);
  provider_device_bytes_ = device_bytes;
  w_.globals_.clear();
  w_.layers_.clear();
  dtype_ = dtype;
  device_ = device;
}

void T5Encoder::to(at::ScalarType dtype, at::Device device) {
  check_input(!provider_, "T5 encoder: weights placed by a layer provider cannot be moved");
  for (auto& kv : w_.globals_) kv.second = kv.second.to(device, dtype);
  for (auto& l : w_.layers_)
    for (auto& kv : l) {
      // transformers keeps the feed-forward output projection in float32 for half precisions.
      const bool wo = kv.first == "layer.1.DenseReluDense.wo.weight";
      kv.second = kv.second.to(device, wo && low_precision(dtype) ? at::kFloat : dtype);
    }
  dtype_ = dtype;
  device_ = device;
}

int64_t T5Encoder::resident_bytes() const {
  if (provider_) return provider_device_bytes_;
  int64_t b = 0;
  for (const auto& kv : w_.globals_)
    if (kv.first != "relative_attention_bias") b += static_cast<int64_t>(kv.second.nbytes());
  b += static_cast<int64_t>(w_.globals_.at("relative_attention_bias").nbytes());
  for (const auto& l : w_.layers_)
    for (const auto& kv : l) b += static_cast<int64_t>(kv.second.nbytes());
  return b;
}

at::Tensor T5Encoder::position_bias(int64_t L) {
  const at::Tensor pos = at::arange(L, at::TensorOptions().dtype(at::kLong).device(device_));
  const at::Tensor rel = pos.unsqueeze(0) - pos.unsqueeze(1);  // [query, key] = key - query
  const at::Tensor buckets =
      t5_relative_position_bucket(rel, cfg_.relative_attention_num_buckets, cfg_.relative_attention_max_distance);
  return at::embedding(layers().globals().at("relative_attention_bias"), buckets).permute({2, 0, 1}).unsqueeze(0);
}

at::Tensor T5Encoder::forward(const at::Tensor& input_ids, const TextEncoderLora* lora, bool checkpoint) {
  check_input(input_ids.dim() == 2, "T5 encoder: input_ids must be [batch, length]");
  const int64_t B = input_ids.size(0), L = input_ids.size(1);
  const int64_t heads = cfg_.num_heads, Dk = cfg_.d_kv, I = cfg_.inner_dim();
  const at::Tensor ids = input_ids.to(device_, at::kLong);
  check_input(B == 0 || (ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < cfg_.vocab_size),
              "T5 encoder: token id outside the vocabulary (0.." + std::to_string(cfg_.vocab_size - 1) + ")");
  BlockWeights& weights = layers();
  at::Tensor x = at::embedding(weights.globals().at("shared.weight"), ids);
  const at::Tensor bias = position_bias(L);
  const double lora_scale = lora ? lora->scale() : 0.0;
  // The layer function is run again in backward under checkpointing: it captures by value.
  const T5EncoderConfig cfg = cfg_;
  const std::string act = cfg.act();

  for (int layer = 0; layer < static_cast<int>(cfg.num_layers); ++layer) {
    auto fn = [cfg, act, lora, layer, lora_scale, B, L, heads, Dk, I](const std::vector<at::Tensor>& acts,
                                                                      const TensorMap& w) -> std::vector<at::Tensor> {
      const at::Tensor &x = acts[0], &bias = acts[1];
      auto proj = [&](const at::Tensor& in, const char* name) {
        return linear_lora(in, w.at(std::string("layer.0.SelfAttention.") + name + ".weight"), at::Tensor(),
                           lora ? lora->find(layer, name) : nullptr, lora_scale);
      };
      at::Tensor h = rms_norm(x, w.at("layer.0.layer_norm.weight"), cfg.layer_norm_epsilon);
      auto heads_of = [&](const at::Tensor& t) { return t.view({B, L, heads, Dk}).transpose(1, 2); };
      const at::Tensor q = heads_of(proj(h, "q")), k = heads_of(proj(h, "k")), v = heads_of(proj(h, "v"));
      at::Tensor scores = at::matmul(q, k.transpose(-1, -2)) + bias;  // T5: no 1/sqrt(d) scaling
      at::Tensor o = at::matmul(encoder_ops::softmax(scores), v).transpose(1, 2).reshape({B, L, I});
      at::Tensor y = x + proj(o, "o");
      h = rms_norm(y, w.at("layer.1.layer_norm.weight"), cfg.layer_norm_epsilon);
      at::Tensor ff;
      if (cfg.gated())
        ff = encoder_ops::activation(at::linear(h, w.at("layer.1.DenseReluDense.wi_0.weight")), act) *
             at::linear(h, w.at("layer.1.DenseReluDense.wi_1.weight"));
      else
        ff = encoder_ops::activation(at::linear(h, w.at("layer.1.DenseReluDense.wi.weight")), act);
      const at::Tensor& wo = w.at("layer.1.DenseReluDense.wo.weight");
      return {y + at::linear(ff.to(wo.scalar_type()), wo)};
    };
    std::vector<at::Tensor> params = lora ? lora->layer_parameters(layer) : std::vector<at::Tensor>{};
    x = run_block(weights, layer, fn, {x, bias}, params, checkpoint)[0];
  }
  return rms_norm(x, weights.globals().at("encoder.final_layer_norm.weight"), cfg_.layer_norm_epsilon);
}

}  // namespace fluxtrain
