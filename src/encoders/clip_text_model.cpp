#include "encoders/clip_text_model.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/error.h"
#include "encoders/encoder_ops.h"
#include "encoders/hf_weights.h"
#include "model/block_runner.h"

namespace fluxtrain {
namespace {

const char* kProjs[] = {"q_proj", "k_proj", "v_proj", "out_proj"};

std::string layer_prefix(int64_t i) { return "text_model.encoder.layers." + std::to_string(i) + "."; }

}  // namespace

std::map<std::string, std::vector<int64_t>> ClipTextModel::expected_shapes(const ClipTextConfig& c) {
  const int64_t H = c.hidden_size, F = c.intermediate_size;
  std::map<std::string, std::vector<int64_t>> s;
  s["text_model.embeddings.token_embedding.weight"] = {c.vocab_size, H};
  s["text_model.embeddings.position_embedding.weight"] = {c.max_position_embeddings, H};
  s["text_model.final_layer_norm.weight"] = {H};
  s["text_model.final_layer_norm.bias"] = {H};
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = layer_prefix(i);
    for (const char* proj : kProjs) {
      s[p + "self_attn." + proj + ".weight"] = {H, H};
      s[p + "self_attn." + proj + ".bias"] = {H};
    }
    for (const char* ln : {"layer_norm1", "layer_norm2"}) {
      s[p + ln + ".weight"] = {H};
      s[p + ln + ".bias"] = {H};
    }
    s[p + "mlp.fc1.weight"] = {F, H};
    s[p + "mlp.fc1.bias"] = {F};
    s[p + "mlp.fc2.weight"] = {H, F};
    s[p + "mlp.fc2.bias"] = {H};
  }
  return s;
}

std::vector<TextLoraTarget> ClipTextModel::lora_targets(const ClipTextConfig& c) {
  std::vector<TextLoraTarget> t;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    for (const char* proj : kProjs)
      t.push_back({layer_prefix(i) + "self_attn." + proj, static_cast<int>(i), proj, c.hidden_size, c.hidden_size});
  return t;
}

ClipTextModel::ClipTextModel(const ClipTextConfig& cfg, const TensorMap& hf_in, const std::string& where)
    : cfg_(cfg), dtype_(at::kFloat) {
  // transformers 4 wrote "text_model.<name>" (FLUX.1's files); transformers 5 writes "<name>".
  TensorMap hf;
  for (const auto& [name, t] : hf_in) hf[name.rfind("text_model.", 0) == 0 ? name : "text_model." + name] = t;
  check_weights(hf, expected_shapes(cfg), where, {"text_model.embeddings.position_ids"});
  w_.layers_.resize(static_cast<size_t>(cfg.num_hidden_layers));
  for (const auto& [name, t] : hf) {
    if (name == "text_model.embeddings.position_ids") continue;
    bool in_layer = false;
    for (int64_t i = 0; i < cfg.num_hidden_layers && !in_layer; ++i) {
      const std::string p = layer_prefix(i);
      if (name.compare(0, p.size(), p) == 0) {
        w_.layers_[static_cast<size_t>(i)][name.substr(p.size())] = t;
        in_layer = true;
      }
    }
    if (!in_layer) w_.globals_[name] = t;
  }
  if (!hf.empty()) dtype_ = hf.begin()->second.scalar_type();
}

std::unique_ptr<ClipTextModel> ClipTextModel::load(const std::string& dir, at::ScalarType dtype, at::Device device) {
  const ClipTextConfig cfg = ClipTextConfig::from_json(read_hf_config(dir), dir + "/config.json");
  auto m = std::make_unique<ClipTextModel>(cfg, load_hf_weights(dir), dir);
  m->to(dtype, device);
  return m;
}

void ClipTextModel::to(at::ScalarType dtype, at::Device device) {
  for (auto& kv : w_.globals_) kv.second = kv.second.to(device, dtype);
  for (auto& l : w_.layers_)
    for (auto& kv : l) kv.second = kv.second.to(device, dtype);
  dtype_ = dtype;
  device_ = device;
}

int64_t ClipTextModel::resident_bytes() const {
  int64_t b = 0;
  for (const auto& kv : w_.globals_) b += static_cast<int64_t>(kv.second.nbytes());
  for (const auto& l : w_.layers_)
    for (const auto& kv : l) b += static_cast<int64_t>(kv.second.nbytes());
  return b;
}

ClipTextModel::Output ClipTextModel::forward(const at::Tensor& input_ids, const TextEncoderLora* lora, bool checkpoint) {
  check_input(input_ids.dim() == 2, "CLIP text model: input_ids must be [batch, length]");
  const int64_t B = input_ids.size(0), L = input_ids.size(1), H = cfg_.hidden_size;
  const int64_t heads = cfg_.num_attention_heads, D = cfg_.head_dim();
  check_input(L <= cfg_.max_position_embeddings, "CLIP text model: " + std::to_string(L) +
                                                     " tokens exceed max_position_embeddings " +
                                                     std::to_string(cfg_.max_position_embeddings));
  const at::Tensor ids = input_ids.to(device_, at::kLong);
  check_input(B == 0 || (ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < cfg_.vocab_size),
              "CLIP text model: token id outside the vocabulary (0.." + std::to_string(cfg_.vocab_size - 1) + ")");
  const TensorMap& g = w_.globals_;
  at::Tensor x = at::embedding(g.at("text_model.embeddings.token_embedding.weight"), ids) +
                 g.at("text_model.embeddings.position_embedding.weight").slice(0, 0, L).unsqueeze(0);
  // Causal mask: position i sees positions <= i.
  const at::Tensor mask =
      at::full({L, L}, -std::numeric_limits<double>::infinity(), x.options()).triu(1).view({1, 1, L, L});
  const double attn_scale = 1.0 / std::sqrt(static_cast<double>(D));
  const double lora_scale = lora ? lora->scale() : 0.0;
  // The layer function is run again in backward under checkpointing: it captures by value.
  const ClipTextConfig cfg = cfg_;

  for (int layer = 0; layer < static_cast<int>(cfg.num_hidden_layers); ++layer) {
    auto fn = [cfg, lora, layer, mask, attn_scale, lora_scale, B, L, H, heads, D](
                  const std::vector<at::Tensor>& acts, const TensorMap& w) -> std::vector<at::Tensor> {
      const at::Tensor& x = acts[0];
      auto proj = [&](const at::Tensor& in, const char* name) {
        const std::string p = std::string("self_attn.") + name;
        return linear_lora(in, w.at(p + ".weight"), w.at(p + ".bias"), lora ? lora->find(layer, name) : nullptr,
                           lora_scale);
      };
      at::Tensor h = encoder_ops::layer_norm(x, w.at("layer_norm1.weight"), w.at("layer_norm1.bias"), cfg.layer_norm_eps);
      auto heads_of = [&](const at::Tensor& t) { return t.view({B, L, heads, D}).transpose(1, 2); };
      const at::Tensor q = heads_of(proj(h, "q_proj")), k = heads_of(proj(h, "k_proj")), v = heads_of(proj(h, "v_proj"));
      at::Tensor scores = at::matmul(q, k.transpose(-1, -2)) * attn_scale + mask;
      at::Tensor o = at::matmul(encoder_ops::softmax(scores), v).transpose(1, 2).reshape({B, L, H});
      at::Tensor y = x + proj(o, "out_proj");
      h = encoder_ops::layer_norm(y, w.at("layer_norm2.weight"), w.at("layer_norm2.bias"), cfg.layer_norm_eps);
      h = at::linear(h, w.at("mlp.fc1.weight"), w.at("mlp.fc1.bias"));
      h = at::linear(encoder_ops::activation(h, cfg.hidden_act), w.at("mlp.fc2.weight"), w.at("mlp.fc2.bias"));
      return {y + h};
    };
    std::vector<at::Tensor> params = lora ? lora->layer_parameters(layer) : std::vector<at::Tensor>{};
    x = run_block(w_, layer, fn, {x}, params, checkpoint)[0];
  }
  Output out;
  out.last_hidden_state = encoder_ops::layer_norm(x, g.at("text_model.final_layer_norm.weight"),
                                                  g.at("text_model.final_layer_norm.bias"), cfg_.layer_norm_eps);
  // transformers: with the legacy eos_token_id 2 the EOS is the largest id; otherwise the first
  // occurrence of eos_token_id (padding may repeat it).
  at::Tensor pos = cfg_.eos_token_id == 2 ? ids.to(at::kInt).argmax(-1)
                                          : ids.eq(cfg_.eos_token_id).to(at::kInt).argmax(-1);
  out.pooled = out.last_hidden_state.index({at::arange(B, ids.options()), pos});
  return out;
}

}  // namespace fluxtrain
