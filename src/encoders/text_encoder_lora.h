// LoRA adapters on a text encoder's attention projections (CLIP: q_proj k_proj v_proj out_proj,
// T5: q k v o). Each adds scale * B(A(x)) to its linear, scale = alpha / rank, as peft does.
// A and B are float32 masters (A: kaiming-uniform as peft, B: zeros); compute casts them to the
// activation dtype, so gradients reach the masters in float32. The frozen base never needs grad.
// Names are the module paths of the Hugging Face model ("text_model.encoder.layers.0.self_attn.q_proj",
// "encoder.block.0.layer.0.SelfAttention.q"); state() writes peft's lora_A / lora_B keys.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"

namespace fluxtrain {

struct TextLoraTarget {
  std::string module;  // full module path in the HF model
  int layer = 0;
  std::string proj;    // "q_proj" / "q" ...
  int64_t in_features = 0, out_features = 0;
};

struct TextLoraAdapter {
  TextLoraTarget target;
  at::Tensor A;  // lora_A.weight [rank, in], float32, requires_grad
  at::Tensor B;  // lora_B.weight [out, rank], float32, requires_grad
};

class TextEncoderLora {
 public:
  TextEncoderLora() = default;
  // New adapters, deterministic in seed.
  static TextEncoderLora create(const std::vector<TextLoraTarget>& targets, int64_t rank, double alpha, uint64_t seed);
  bool empty() const { return adapters_.empty(); }
  int64_t rank() const { return rank_; }
  double alpha() const { return alpha_; }
  double scale() const { return alpha_ / static_cast<double>(rank_); }
  const TextLoraAdapter* find(int layer, const std::string& proj) const;
  std::vector<TextLoraAdapter>& adapters() { return adapters_; }
  const std::vector<TextLoraAdapter>& adapters() const { return adapters_; }
  std::vector<at::Tensor> parameters() const;                 // A, B of every adapter, in order
  std::vector<at::Tensor> layer_parameters(int layer) const;  // the adapters of one layer
  // "<prefix><module>.lora_A.weight" / ".lora_B.weight".
  TensorMap state(const std::string& prefix) const;
  // kohya/ComfyUI names: "<kohya_prefix>_<module, '.' -> '_'>.lora_down.weight" / ".lora_up.weight"
  // / ".alpha" (float32 scalar); kohya_prefix "lora_te1" (CLIP) or "lora_te3" (T5), as sd-scripts'
  // FLUX LoRA and ComfyUI name them.
  TensorMap kohya_state(const std::string& kohya_prefix) const;
  // Strict: every adapter's A and B under prefix with the right shapes, no other key under it.
  // Values are copied into the masters (which keep their identity, so optimizer state stays valid).
  void load_state(const TensorMap& tensors, const std::string& prefix, const std::string& source);
  // The adapters a file holds under prefix (rank from the shapes), for loading without create().
  static TextEncoderLora from_state(const std::vector<TextLoraTarget>& targets, const TensorMap& tensors,
                                    const std::string& prefix, double alpha, const std::string& source);
  // Moves the masters (float32 normally; float64 for finite-difference tests).
  void to(const at::Device& device, at::ScalarType master_dtype = at::kFloat);

 private:
  std::vector<TextLoraAdapter> adapters_;
  int64_t rank_ = 0;
  double alpha_ = 0;
};

// kohya's module name of a text-encoder module path ("lora_te1", "text_model.encoder.layers.0.self_attn.q_proj"
// -> "lora_te1_text_model_encoder_layers_0_self_attn_q_proj").
std::string kohya_text_module(const std::string& kohya_prefix, const std::string& module);

// x W^T (+ b) (+ scale * (x A^T) B^T when adapter is given).
at::Tensor linear_lora(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const TextLoraAdapter* adapter, double scale);

}  // namespace fluxtrain
