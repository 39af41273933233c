// FLUX.1 transformer weight files: the BFL key layout (our internal names), the diffusers
// layout (split q/k/v, sharded with an index), random initialisation, strict loading.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/Device.h>

#include "core/tensor_map.h"
#include "model/flux_config.h"

namespace fluxtrain {

// Every BFL key of the transformer with its expected shape, in a fixed order.
std::vector<std::pair<std::string, std::vector<int64_t>>> flux_weight_shapes(const FluxConfig& cfg);

// Random weights (deterministic in seed) at a scale that keeps activations O(1) through all
// blocks, so that the tiny model trains and the benchmark runs on realistic numbers.
// With a non-CPU device the weights are drawn there (its generator seeded with seed).
TensorMap init_random_weights(const FluxConfig& cfg, uint64_t seed, at::ScalarType dtype,
                              c10::Device device = c10::Device(c10::kCPU));

// Strict check: every expected key present with its shape, nothing unexpected.
// Errors name the key, the file and both shapes.
void check_weights(const FluxConfig& cfg, const TensorMap& w, const std::string& file);

// BFL <-> diffusers key conversion (tensor data is split/concatenated, not copied twice).
TensorMap bfl_to_diffusers(const FluxConfig& cfg, const TensorMap& bfl);
TensorMap diffusers_to_bfl(const FluxConfig& cfg, const TensorMap& diff, const std::string& file);

struct LoadedTransformer {
  FluxConfig config;
  TensorMap weights;     // BFL names
  std::string source;    // file or folder it came from
  std::string layout;    // "bfl" or "diffusers"
};

// Loads from a BFL single file, a diffusers transformer folder, or a Hugging Face snapshot
// directory holding either (layout: "auto", "bfl" or "diffusers"). Weights are cast to dtype
// (at::ScalarType::Undefined keeps the file's dtype).
LoadedTransformer load_transformer(const std::string& path, const std::string& layout = "auto",
                                   at::ScalarType dtype = at::ScalarType::Undefined);

// Writers (atomic per file). The BFL file carries the config in its metadata so that it is
// self-describing; the diffusers folder gets config.json, shards and the index.
void save_bfl(const std::string& file, const FluxConfig& cfg, const TensorMap& bfl);
void save_diffusers(const std::string& dir, const FluxConfig& cfg, const TensorMap& bfl,
                    uint64_t max_shard_bytes = 5ull << 30);

}  // namespace fluxtrain
