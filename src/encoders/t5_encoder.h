// T5 v1.1's encoder (T5EncoderModel; FLUX's text_encoder_2/, T5-XXL): token embedding, pre-norm
// layers (RMS norm without mean or bias, self-attention without score scaling plus the relative
// position bias that layer 0 owns and every layer adds, gated-GELU feed-forward), final RMS norm.
// No attention mask: FLUX attends to the padding too. In bf16/f16 norms and softmax run in float32
// and the feed-forward output projection (wo) stays float32, as transformers keeps it.
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

class T5Encoder {
 public:
  T5Encoder(const T5EncoderConfig& cfg, const TensorMap& hf_weights, const std::string& where);
  // dir: a text_encoder_2/ folder (config.json + shards + model.safetensors.index.json, or one file).
  static std::unique_ptr<T5Encoder> load(const std::string& dir, at::ScalarType dtype, at::Device device);
  // The same, with the weights left as the files hold them (host, stored dtype: views of the
  // mapped files), for a caller that places them itself (use_layer_provider).
  static std::unique_ptr<T5Encoder> load_stored(const std::string& dir);

  static std::map<std::string, std::vector<int64_t>> expected_shapes(const T5EncoderConfig& cfg);
  static std::vector<TextLoraTarget> lora_targets(const T5EncoderConfig& cfg);  // q k v o
  const T5EncoderConfig& config() const { return cfg_; }
  void to(at::ScalarType dtype, at::Device device);
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }
  int64_t resident_bytes() const;  // frozen weights on the compute device
  // The frozen weights (globals + per layer) as loaded; none ever requires grad. Empty once a
  // layer provider took them over.
  const EncoderLayerWeights& weights() const { return w_; }
  // Hands the frozen weights over to a caller that places them (place_t5_low_memory): the
  // encoder runs nothing until use_layer_provider gives it a provider.
  EncoderLayerWeights take_weights();
  // Runs the layers and globals from another provider from now on (fp8 and/or streamed from
  // host memory: train/setup.h place_t5_low_memory, built from weights()), computing in
  // dtype on device; the weights held so far are dropped. device_bytes: what the provider
  // holds on the device (for resident_bytes).
  void use_layer_provider(std::unique_ptr<BlockWeights> provider, at::ScalarType dtype, at::Device device,
                          int64_t device_bytes);
  bool has_layer_provider() const { return provider_ != nullptr; }

  // input_ids [B, L] int64 -> last hidden state [B, L, d_model] in the compute dtype.
  at::Tensor forward(const at::Tensor& input_ids, const TextEncoderLora* lora = nullptr, bool checkpoint = false);
  // Relative position bias [1, heads, L, L] (exposed for tests).
  at::Tensor position_bias(int64_t length);

 private:
  T5EncoderConfig cfg_;
  EncoderLayerWeights w_;
  std::unique_ptr<BlockWeights> provider_;  // replaces w_ when set
  int64_t provider_device_bytes_ = 0;
  BlockWeights& layers() { return provider_ ? *provider_ : static_cast<BlockWeights&>(w_); }
  at::ScalarType dtype_;
  at::Device device_ = at::kCPU;
};

// T5's bucket of each relative position (memory - query), bidirectional, as transformers computes it.
at::Tensor t5_relative_position_bucket(const at::Tensor& relative_position, int64_t num_buckets, int64_t max_distance);

}  // namespace fluxtrain
