// Hugging Face model folders (text_encoder/, text_encoder_2/): config.json plus either one
// model.safetensors or shards listed by model.safetensors.index.json. Loading checks the index
// against the shards; strict key/shape checks against what a model expects are in check_weights.
#pragma once
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/tensor_map.h"

namespace fluxtrain {

nlohmann::json read_hf_config(const std::string& dir);  // dir/config.json; Error naming it when bad
// Every tensor of the folder (CPU, stored dtype).
TensorMap load_hf_weights(const std::string& dir);
// Writes dir/model.safetensors, or shards model-0000i-of-0000n.safetensors + index when the
// tensors exceed max_shard_bytes (the layout save_pretrained writes). Atomic per file.
void save_hf_weights(const std::string& dir, const TensorMap& w, uint64_t max_shard_bytes);

// Every expected name present with its shape, and nothing else but `ignored` names.
// Throws one Error naming `where`, the first offending tensor and what was expected.
void check_weights(const TensorMap& w, const std::map<std::string, std::vector<int64_t>>& expected,
                   const std::string& where, const std::set<std::string>& ignored = {});

}  // namespace fluxtrain
