// FLUX autoencoder weight files: BFL's `ae.safetensors` key layout (our internal names) and the
// diffusers `vae/` folder (AutoencoderKL: config.json + diffusion_pytorch_model.safetensors),
// random initialisation, strict loading (every key present with its shape, nothing unexpected).
//
// Name correspondence (BFL -> diffusers): encoder.down.i.block.j -> encoder.down_blocks.i.resnets.j,
// nin_shortcut -> conv_shortcut, down.i.downsample.conv -> down_blocks.i.downsamplers.0.conv,
// mid.block_1/2 -> mid_block.resnets.0/1, mid.attn_1.{norm,q,k,v,proj_out} ->
// mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0} (1x1 conv [C,C,1,1] <-> linear
// [C,C]), norm_out -> conv_norm_out; the decoder's levels are numbered in reverse:
// decoder.up.i -> decoder.up_blocks.(L-1-i), upsample.conv -> upsamplers.0.conv.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/ScalarType.h>

#include "core/tensor_map.h"
#include "encoders/autoencoder.h"

namespace fluxtrain {

// Every BFL key with its expected shape, in a fixed order.
std::vector<std::pair<std::string, std::vector<int64_t>>> autoencoder_weight_shapes(const AutoencoderConfig& cfg);

// Strict check of BFL-named weights; errors name the file, the key and both shapes.
void check_autoencoder_weights(const AutoencoderConfig& cfg, const TensorMap& w, const std::string& file);

// Deterministic random weights (seed) at a scale that keeps activations O(1) through the network.
TensorMap init_random_autoencoder(const AutoencoderConfig& cfg, uint64_t seed, at::ScalarType dtype);

TensorMap autoencoder_bfl_to_diffusers(const AutoencoderConfig& cfg, const TensorMap& bfl);
TensorMap autoencoder_diffusers_to_bfl(const AutoencoderConfig& cfg, const TensorMap& diff, const std::string& file);

struct LoadedAutoencoder {
  AutoencoderConfig config;
  TensorMap weights;   // BFL names
  std::string source;  // file or folder it came from
  std::string layout;  // "bfl" | "diffusers"
};

// path: a BFL ae.safetensors file, a diffusers vae/ folder, or a snapshot directory holding
// ae.safetensors and/or vae/ (layout "auto" prefers ae.safetensors, like the transformer loader
// prefers the BFL file). BFL files carry no config: fluxtrain's own files have it in their
// metadata, others get it from the shapes (widths, levels, latent channels) with FLUX's
// GroupNorm 32 and scaling/shift factors. dtype Undefined keeps the file's.
LoadedAutoencoder load_autoencoder(const std::string& path, const std::string& layout = "auto",
                                   at::ScalarType dtype = at::ScalarType::Undefined);
// True when path is (or holds) an autoencoder load_autoencoder can open.
bool has_autoencoder(const std::string& path);

// Writers (atomic per file): BFL single file with the config in its metadata; diffusers folder
// with config.json and diffusion_pytorch_model.safetensors.
void save_autoencoder_bfl(const std::string& file, const AutoencoderConfig& cfg, const TensorMap& bfl);
void save_autoencoder_diffusers(const std::string& dir, const AutoencoderConfig& cfg, const TensorMap& bfl);

// init-model's part: a random autoencoder of the given size written as <dir>/ae.safetensors
// (layout bfl/both) and <dir>/vae/ (diffusers/both). Returns what it wrote.
std::vector<std::string> write_random_autoencoder(const std::string& dir, const std::string& size, uint64_t seed,
                                                  at::ScalarType dtype, const std::string& layout);

}  // namespace fluxtrain
