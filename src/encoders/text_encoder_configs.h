// Configurations of the two text encoders, read from / written as the config.json that
// transformers writes for CLIPTextModel and T5EncoderModel.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace fluxtrain {

struct ClipTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t max_position_embeddings = 77;
  double layer_norm_eps = 1e-5;
  std::string hidden_act = "quick_gelu";  // quick_gelu, gelu, gelu_new, relu
  int64_t bos_token_id = 0, eos_token_id = 2, pad_token_id = 1;  // eos 2: pooled at argmax(ids)
  int64_t projection_dim = 768;

  static ClipTextConfig clip_l();
  static ClipTextConfig tiny(int64_t hidden);
  static ClipTextConfig from_json(const nlohmann::json& j, const std::string& file);
  nlohmann::json to_json() const;
  int64_t head_dim() const { return hidden_size / num_attention_heads; }
};

struct T5EncoderConfig {
  int64_t vocab_size = 32128;
  int64_t d_model = 4096;
  int64_t d_kv = 64;
  int64_t d_ff = 10240;
  int64_t num_layers = 24;
  int64_t num_heads = 64;
  int64_t relative_attention_num_buckets = 32;
  int64_t relative_attention_max_distance = 128;
  double layer_norm_epsilon = 1e-6;
  std::string feed_forward_proj = "gated-gelu";  // gated-<act> or <act>

  static T5EncoderConfig t5_xxl();
  static T5EncoderConfig tiny(int64_t d_model);
  static T5EncoderConfig from_json(const nlohmann::json& j, const std::string& file);
  nlohmann::json to_json() const;
  bool gated() const { return feed_forward_proj.rfind("gated-", 0) == 0; }
  // transformers' activation name: "gated-gelu" means the tanh approximation (gelu_new).
  std::string act() const;
  int64_t inner_dim() const { return num_heads * d_kv; }
};

}  // namespace fluxtrain
