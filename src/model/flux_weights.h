// FLUX.1 transformer weight files: the BFL key layout (our internal names), the diffusers
// layout (split q/k/v, sharded with an index), random initialisation, strict loading.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/Device.h>

#include "core/tensor_map.h"
#include "model/flux_config.h"

namespace fluxtrain {

// Every BFL key of the transformer with its expected shape, in a fixed order.
std::vector<std::pair<std::string, std::vector<int64_t>>> flux_weight_shapes(const FluxConfig& cfg);
// Names and shapes of block i's tensors (block-local BFL names, BlockWeights numbering), without
// any file: what --max_gpu_memory plans with (WeightsSource::block_shapes).
std::vector<std::pair<std::string, std::vector<int64_t>>> flux_block_shapes(const FluxConfig& cfg, int block);

// Random weights (deterministic in seed) at a scale that keeps activations O(1) through all
// blocks, so that the tiny model trains and the benchmark runs on realistic numbers.
// With a non-CPU device the weights are drawn there (its generator seeded with seed).
TensorMap init_random_weights(const FluxConfig& cfg, uint64_t seed, at::ScalarType dtype,
                              c10::Device device = c10::Device(c10::kCPU));
// The same kind of weights drawn on the host a part at a time, so that a caller that places or
// quantises block by block never holds the whole model (bench's low-memory rows): the globals
// (every key outside the blocks, full names), and block i (BlockWeights numbering: doubles, then
// singles) under its block-local names. Each block has its own random stream (deterministic in
// seed and i); the values differ from init_random_weights'.
TensorMap init_random_global_weights(const FluxConfig& cfg, uint64_t seed, at::ScalarType dtype);
TensorMap init_random_block_weights(const FluxConfig& cfg, uint64_t seed, int block, at::ScalarType dtype);

// Strict check: every expected key present with its shape, nothing unexpected.
// Errors name the key, the file and both shapes.
void check_weights(const FluxConfig& cfg, const TensorMap& w, const std::string& file);

// BFL <-> diffusers key conversion (tensor data is split/concatenated, not copied twice).
TensorMap bfl_to_diffusers(const FluxConfig& cfg, const TensorMap& bfl);
TensorMap diffusers_to_bfl(const FluxConfig& cfg, const TensorMap& diff, const std::string& file);

// An opened transformer whose tensors are read on demand, one block at a time, so that a
// sharded rank never holds more than one block of the full model (plus the globals) in host
// memory. Every key's presence and shape was checked when it was opened; reading a part
// copies it out of the memory-mapped files, converts it (diffusers layout: q/k/v concatenated)
// and casts it. Copies share the open files; const methods may be called from any thread.
class TransformerSource {
 public:
  TransformerSource();
  FluxConfig config;
  std::string source;  // file or folder it came from
  std::string layout;  // "bfl" or "diffusers"

  int num_blocks() const;
  // The non-block tensors (embedders, final layer) under their full BFL names.
  TensorMap globals() const;
  // Block i's tensors under relative BFL names ("img_attn.qkv.weight"), i as in BlockWeights:
  // double blocks 0..depth-1, single blocks depth..depth+depth_single-1.
  TensorMap block(int i) const;
  // The whole model under full BFL names: globals() and every block, prefixed.
  TensorMap load_all() const;

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
  friend TransformerSource open_transformer(const std::string&, const std::string&, at::ScalarType);
};

// Opens a BFL single file, a diffusers transformer folder, or a Hugging Face snapshot
// directory holding either (layout: "auto", "bfl" or "diffusers"), and validates every file
// header, key and shape without reading tensor data. Tensors are cast to dtype as they are
// read (at::ScalarType::Undefined keeps the file's dtype).
TransformerSource open_transformer(const std::string& path, const std::string& layout = "auto",
                                   at::ScalarType dtype = at::ScalarType::Undefined);

struct LoadedTransformer {
  FluxConfig config;
  TensorMap weights;     // BFL names
  std::string source;    // file or folder it came from
  std::string layout;    // "bfl" or "diffusers"
};

// The whole model at once: open_transformer(path, layout, dtype).load_all().
LoadedTransformer load_transformer(const std::string& path, const std::string& layout = "auto",
                                   at::ScalarType dtype = at::ScalarType::Undefined);

// Writers (atomic per file). The BFL file carries the config in its metadata so that it is
// self-describing; the diffusers folder gets config.json, shards and the index.
void save_bfl(const std::string& file, const FluxConfig& cfg, const TensorMap& bfl);
void save_diffusers(const std::string& dir, const FluxConfig& cfg, const TensorMap& bfl,
                    uint64_t max_shard_bytes = 5ull << 30);

}  // namespace fluxtrain
