// The FLUX.1 autoencoder (BFL's AutoEncoder = diffusers' AutoencoderKL at the FLUX configuration):
// images in [-1, 1] <-> 16-channel latents at 1/8 of the pixel size.
//
// Encoder: conv_in, per level `layers_per_block` resnet blocks (GroupNorm-SiLU-conv x2, 1x1
// shortcut when the width changes) and a stride-2 downsample (zero pad right/bottom by one, 3x3
// conv) except after the last level; mid block = resnet, single-head self-attention over all
// positions (GroupNorm, 1x1 q/k/v/proj, residual), resnet; GroupNorm-SiLU-conv_out to 2C
// channels (mean, logvar). Decoder mirrors it with `layers_per_block + 1` resnets per level and
// nearest-x2 upsampling followed by a 3x3 conv. GroupNorm eps 1e-6 everywhere.
//
// Weights are held under BFL's `ae.safetensors` names (autoencoder_weights.h converts the
// diffusers `vae/` names). Latents handed to the transformer (and stored in datasets) are the
// posterior mean shifted and scaled: (mean - shift_factor) * scaling_factor.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>
#include <nlohmann/json_fwd.hpp>

#include "core/tensor_map.h"

namespace fluxtrain {

struct AutoencoderConfig {
  int64_t in_channels = 3, out_channels = 3;
  std::vector<int64_t> block_out_channels{128, 256, 512, 512};  // diffusers; BFL: ch * ch_mult
  int64_t layers_per_block = 2;
  int64_t latent_channels = 16;
  int64_t norm_num_groups = 32;
  double scaling_factor = 0.3611, shift_factor = 0.1159;

  int64_t num_levels() const { return static_cast<int64_t>(block_out_channels.size()); }
  int64_t downscale() const { return int64_t{1} << (num_levels() - 1); }  // 8 for FLUX
  void validate(const std::string& where) const;

  static AutoencoderConfig flux();
  // Same structure at a small width (GroupNorm 32 still divides every width): 8x downscale,
  // 16 latent channels, one resnet per level. Runs on a CPU in milliseconds at 64x64.
  static AutoencoderConfig tiny();
  static AutoencoderConfig preset(const std::string& name);  // "tiny" | "flux" (also flux-dev, ...)
  // diffusers vae/config.json (AutoencoderKL) <-> config. Rejects what FLUX's VAE does not have
  // (quant convs, other block types), naming the file and key.
  static AutoencoderConfig from_diffusers_json(const nlohmann::json& j, const std::string& file);
  nlohmann::json to_diffusers_json() const;
  bool operator==(const AutoencoderConfig& o) const;
};

// Tiling: the image (or latent grid) is cut into overlapping square tiles, each tile runs through
// the whole network, and the outputs are blended with weights that ramp linearly across every
// overlap (normalised, so flat regions are reproduced exactly). Bounds memory: activations scale
// with the tile, not the image. The mid-block attention and GroupNorm statistics see one tile at
// a time, so tiled output differs slightly from untiled (measured in tests/py/test_autoencoder.py).
struct TileOptions {
  int64_t tile_px = 0;     // tile side in pixels (multiple of 8 x 2); 0 = never tile
  int64_t overlap_px = 0;  // overlap between neighbouring tiles in pixels (multiple of 8)
  bool enabled() const { return tile_px > 0; }
  static TileOptions none() { return {}; }
  static TileOptions defaults() { return {512, 128}; }
};

class Autoencoder {
 public:
  Autoencoder() = default;
  // weights: BFL names, checked strictly against cfg (autoencoder_weights.h).
  Autoencoder(const AutoencoderConfig& cfg, TensorMap weights);
  const AutoencoderConfig& config() const { return cfg_; }
  const TensorMap& weights() const { return w_; }
  bool loaded() const { return !w_.empty(); }
  // Moves/casts the weights (e.g. to CUDA bf16). Activations follow the weights' dtype.
  void to(const at::TensorOptions& opts);

  // images [B, 3, H, W] in [-1, 1], H and W multiples of 8 -> posterior moments [B, 2C, H/8, W/8]
  // (mean then logvar, unclamped). No gradients.
  at::Tensor encode_moments(const at::Tensor& images, const TileOptions& tile = TileOptions::none()) const;
  // The posterior mean, shifted and scaled for the transformer: [B, C, H/8, W/8].
  at::Tensor encode(const at::Tensor& images, const TileOptions& tile = TileOptions::none()) const;
  // Inverse of encode's scaling, then the decoder: latents [B, C, h, w] -> images [B, 3, 8h, 8w].
  at::Tensor decode(const at::Tensor& latents, const TileOptions& tile = TileOptions::none()) const;
  // The raw networks (no shift/scale, no tiling), for tests.
  at::Tensor run_encoder(const at::Tensor& images) const;
  at::Tensor run_decoder(const at::Tensor& z) const;

 private:
  AutoencoderConfig cfg_;
  TensorMap w_;
  const at::Tensor& p(const std::string& name) const;
  at::Tensor resnet(const at::Tensor& x, const std::string& prefix) const;
  at::Tensor attention(const at::Tensor& x, const std::string& prefix) const;
  at::Tensor group_norm(const at::Tensor& x, const std::string& prefix) const;
  at::Tensor conv(const at::Tensor& x, const std::string& prefix, int64_t stride, int64_t pad) const;
};

// Tiled application of a spatial function f whose output is `scale` times the input's size
// (encode: 1/8, decode: 8). tile/overlap are in input units. Exposed for tests.
at::Tensor run_tiled(const at::Tensor& x, int64_t tile, int64_t overlap, double scale,
                     const std::function<at::Tensor(const at::Tensor&)>& f);

}  // namespace fluxtrain
