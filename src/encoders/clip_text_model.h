// CLIP's text transformer (CLIPTextModel; FLUX's text_encoder/, CLIP ViT-L/14): token + position
// embeddings, pre-LN layers with causal self-attention and a quick-GELU MLP, final layer norm,
// pooled output = the final hidden state at the EOS position (transformers' rule for the config:
// eos_token_id 2 -> the position of the largest id, else the first eos_token_id).
// Any dtype; in bf16/f16 the layer norms and the softmax run in float32 (as the reference's).
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "encoders/layer_weights.h"
#include "encoders/text_encoder_configs.h"
#include "encoders/text_encoder_lora.h"

namespace fluxtrain {

class ClipTextModel {
 public:
  // Strict: every tensor of the config's model with its shape, nothing else (position_ids allowed).
  ClipTextModel(const ClipTextConfig& cfg, const TensorMap& hf_weights, const std::string& where);
  // dir: a text_encoder/ folder (config.json + model.safetensors or shards + index).
  static std::unique_ptr<ClipTextModel> load(const std::string& dir, at::ScalarType dtype, at::Device device);

  static std::map<std::string, std::vector<int64_t>> expected_shapes(const ClipTextConfig& cfg);
  static std::vector<TextLoraTarget> lora_targets(const ClipTextConfig& cfg);  // q_proj k_proj v_proj out_proj
  const ClipTextConfig& config() const { return cfg_; }
  void to(at::ScalarType dtype, at::Device device);
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }
  int64_t resident_bytes() const;
  // The frozen weights (globals + per layer); none ever requires grad.
  const EncoderLayerWeights& weights() const { return w_; }

  struct Output {
    at::Tensor last_hidden_state;  // [B, L, hidden]
    at::Tensor pooled;             // [B, hidden]
  };
  // input_ids [B, L] int64 (L <= max_position_embeddings). Differentiable w.r.t. lora's masters.
  Output forward(const at::Tensor& input_ids, const TextEncoderLora* lora = nullptr, bool checkpoint = false);

 private:
  ClipTextConfig cfg_;
  EncoderLayerWeights w_;
  at::ScalarType dtype_;
  at::Device device_ = at::kCPU;
};

}  // namespace fluxtrain
