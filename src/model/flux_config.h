// FLUX.1 transformer dimensions. The same code runs the tiny test model, FLUX.1-dev and schnell.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace fluxtrain {

struct FluxConfig {
  int64_t in_channels = 64;      // 16 latent channels x 2x2 patch
  int64_t out_channels = 64;
  int64_t hidden_size = 3072;
  int64_t num_heads = 24;
  int64_t depth = 19;            // double-stream blocks
  int64_t depth_single = 38;     // single-stream blocks
  double mlp_ratio = 4.0;
  int64_t context_in_dim = 4096; // T5 hidden
  int64_t vec_in_dim = 768;      // CLIP pooled
  std::vector<int64_t> axes_dim{16, 56, 56};
  double theta = 10000.0;
  bool guidance_embed = true;    // dev: true, schnell: false
  bool qkv_bias = true;

  int64_t head_dim() const { return hidden_size / num_heads; }
  int64_t mlp_hidden() const { return static_cast<int64_t>(hidden_size * mlp_ratio); }
  int64_t num_blocks() const { return depth + depth_single; }
  // Checks internal consistency (head_dim == sum(axes_dim), even axes, ...); throws Error.
  void validate(const std::string& where) const;

  // "tiny", "flux-dev", "flux-schnell".
  static FluxConfig preset(const std::string& name);
  // diffusers transformer/config.json <-> FluxConfig.
  static FluxConfig from_diffusers_json(const nlohmann::json& j, const std::string& file);
  nlohmann::json to_diffusers_json() const;
  bool operator==(const FluxConfig& o) const;
};

}  // namespace fluxtrain
