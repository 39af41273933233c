#include "encoders/text_encoder_configs.h"

#include "core/error.h"

namespace fluxtrain {
namespace {

void positive(int64_t v, const char* name, const std::string& file) {
  if (v <= 0) throw Error(file + ": '" + std::string(name) + "' must be positive");
}

void known_act(const std::string& a, const std::string& file) {
  if (a != "quick_gelu" && a != "gelu" && a != "gelu_new" && a != "relu" && a != "gelu_pytorch_tanh")
    throw Error(file + ": activation '" + a + "' is not supported (quick_gelu, gelu, gelu_new, relu)");
}

}  // namespace

ClipTextConfig ClipTextConfig::clip_l() { return ClipTextConfig{}; }

ClipTextConfig ClipTextConfig::tiny(int64_t hidden) {
  ClipTextConfig c;
  c.hidden_size = hidden;
  c.intermediate_size = 2 * hidden;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.projection_dim = hidden;
  return c;
}

ClipTextConfig ClipTextConfig::from_json(const nlohmann::json& j0, const std::string& file) {
  // A full CLIPModel config keeps the text part under text_config.
  const nlohmann::json& j = j0.contains("text_config") && j0["text_config"].is_object() ? j0["text_config"] : j0;
  ClipTextConfig c;
  try {
    c.vocab_size = j.value("vocab_size", c.vocab_size);
    c.hidden_size = j.value("hidden_size", c.hidden_size);
    c.intermediate_size = j.value("intermediate_size", c.intermediate_size);
    c.num_hidden_layers = j.value("num_hidden_layers", c.num_hidden_layers);
    c.num_attention_heads = j.value("num_attention_heads", c.num_attention_heads);
    c.max_position_embeddings = j.value("max_position_embeddings", c.max_position_embeddings);
    c.layer_norm_eps = j.value("layer_norm_eps", c.layer_norm_eps);
    c.hidden_act = j.value("hidden_act", c.hidden_act);
    c.bos_token_id = j.value("bos_token_id", c.bos_token_id);
    c.eos_token_id = j.value("eos_token_id", c.eos_token_id);
    c.pad_token_id = j.value("pad_token_id", c.pad_token_id);
    c.projection_dim = j.value("projection_dim", c.projection_dim);
  } catch (const nlohmann::json::exception& e) {
    throw Error(file + ": bad CLIP text config (" + std::string(e.what()) + ")");
  }
  positive(c.vocab_size, "vocab_size", file);
  positive(c.hidden_size, "hidden_size", file);
  positive(c.intermediate_size, "intermediate_size", file);
  positive(c.num_hidden_layers, "num_hidden_layers", file);
  positive(c.num_attention_heads, "num_attention_heads", file);
  positive(c.max_position_embeddings, "max_position_embeddings", file);
  if (c.hidden_size % c.num_attention_heads)
    throw Error(file + ": hidden_size must be a multiple of num_attention_heads");
  known_act(c.hidden_act, file);
  return c;
}

nlohmann::json ClipTextConfig::to_json() const {
  return {{"architectures", {"CLIPTextModel"}},
          {"model_type", "clip_text_model"},
          {"attention_dropout", 0.0},
          {"bos_token_id", bos_token_id},
          {"dropout", 0.0},
          {"eos_token_id", eos_token_id},
          {"hidden_act", hidden_act},
          {"hidden_size", hidden_size},
          {"initializer_factor", 1.0},
          {"initializer_range", 0.02},
          {"intermediate_size", intermediate_size},
          {"layer_norm_eps", layer_norm_eps},
          {"max_position_embeddings", max_position_embeddings},
          {"num_attention_heads", num_attention_heads},
          {"num_hidden_layers", num_hidden_layers},
          {"pad_token_id", pad_token_id},
          {"projection_dim", projection_dim},
          {"torch_dtype", "float32"},
          {"transformers_version", "4.43.3"},
          {"vocab_size", vocab_size}};
}

T5EncoderConfig T5EncoderConfig::t5_xxl() { return T5EncoderConfig{}; }

T5EncoderConfig T5EncoderConfig::tiny(int64_t d_model) {
  T5EncoderConfig c;
  c.d_model = d_model;
  c.num_heads = 4;
  c.d_kv = d_model / 4;
  c.d_ff = 2 * d_model;
  c.num_layers = 2;
  return c;
}

std::string T5EncoderConfig::act() const {
  const std::string a = gated() ? feed_forward_proj.substr(6) : feed_forward_proj;
  return a == "gelu" && gated() ? "gelu_new" : a;
}

T5EncoderConfig T5EncoderConfig::from_json(const nlohmann::json& j, const std::string& file) {
  T5EncoderConfig c;
  try {
    c.vocab_size = j.value("vocab_size", c.vocab_size);
    c.d_model = j.value("d_model", c.d_model);
    c.d_kv = j.value("d_kv", c.d_kv);
    c.d_ff = j.value("d_ff", c.d_ff);
    c.num_layers = j.value("num_layers", c.num_layers);
    c.num_heads = j.value("num_heads", c.num_heads);
    c.relative_attention_num_buckets = j.value("relative_attention_num_buckets", c.relative_attention_num_buckets);
    c.relative_attention_max_distance = j.value("relative_attention_max_distance", c.relative_attention_max_distance);
    c.layer_norm_epsilon = j.value("layer_norm_epsilon", c.layer_norm_epsilon);
    c.feed_forward_proj = j.value("feed_forward_proj", c.feed_forward_proj);
  } catch (const nlohmann::json::exception& e) {
    throw Error(file + ": bad T5 config (" + std::string(e.what()) + ")");
  }
  positive(c.vocab_size, "vocab_size", file);
  positive(c.d_model, "d_model", file);
  positive(c.d_kv, "d_kv", file);
  positive(c.d_ff, "d_ff", file);
  positive(c.num_layers, "num_layers", file);
  positive(c.num_heads, "num_heads", file);
  positive(c.relative_attention_num_buckets, "relative_attention_num_buckets", file);
  positive(c.relative_attention_max_distance, "relative_attention_max_distance", file);
  known_act(c.act(), file);
  return c;
}

nlohmann::json T5EncoderConfig::to_json() const {
  return {{"architectures", {"T5EncoderModel"}},
          {"model_type", "t5"},
          {"classifier_dropout", 0.0},
          {"d_ff", d_ff},
          {"d_kv", d_kv},
          {"d_model", d_model},
          {"decoder_start_token_id", 0},
          {"dense_act_fn", act()},
          {"dropout_rate", 0.1},
          {"eos_token_id", 1},
          {"feed_forward_proj", feed_forward_proj},
          {"initializer_factor", 1.0},
          {"is_encoder_decoder", true},
          {"is_gated_act", gated()},
          {"layer_norm_epsilon", layer_norm_epsilon},
          {"num_decoder_layers", num_layers},
          {"num_heads", num_heads},
          {"num_layers", num_layers},
          {"output_past", true},
          {"pad_token_id", 0},
          {"relative_attention_max_distance", relative_attention_max_distance},
          {"relative_attention_num_buckets", relative_attention_num_buckets},
          {"tie_word_embeddings", false},
          {"torch_dtype", "float32"},
          {"transformers_version", "4.43.3"},
          {"use_cache", true},
          {"vocab_size", vocab_size}};
}

}  // namespace fluxtrain
