#include "model/block_weights.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace fluxtrain {

std::string block_prefix(int block, int64_t depth) {
  return block < depth ? "double_blocks." + std::to_string(block) + "."
                       : "single_blocks." + std::to_string(block - depth) + ".";
}

ResidentBlockWeights::ResidentBlockWeights(const TensorMap& full, int64_t depth, int64_t depth_single)
    : blocks_(static_cast<size_t>(depth + depth_single)) {
  for (const auto& kv : full) {
    const std::string& k = kv.first;
    bool placed = false;
    for (const char* kind : {"double_blocks.", "single_blocks."}) {
      const std::string p(kind);
      if (k.compare(0, p.size(), p) != 0) continue;
      const size_t dot = k.find('.', p.size());
      const int idx = std::stoi(k.substr(p.size(), dot - p.size()));
      const int64_t global = p[0] == 'd' ? idx : depth + idx;
      if (idx < 0 || global >= static_cast<int64_t>(blocks_.size()) || (p[0] == 'd' && idx >= depth))
        throw Error("block weights: key " + k + " is outside the model's " + std::to_string(depth) + "+" +
                    std::to_string(depth_single) + " blocks");
      blocks_[global].emplace(k.substr(dot + 1), kv.second);
      placed = true;
    }
    if (!placed) globals_.emplace(k, kv.second);
  }
}

void ResidentBlockWeights::to(const at::TensorOptions& opts) {
  for (auto& kv : globals_) kv.second = kv.second.to(opts);
  for (auto& b : blocks_)
    for (auto& kv : b) kv.second = kv.second.to(opts);
}

TensorMap ResidentBlockWeights::full() const {
  TensorMap out = globals_;
  const int64_t depth = [&] {
    int64_t d = 0;
    for (const auto& b : blocks_)
      if (b.count("img_attn.qkv.weight")) ++d;
    return d;
  }();
  for (size_t i = 0; i < blocks_.size(); ++i)
    for (const auto& kv : blocks_[i]) out.emplace(block_prefix(static_cast<int>(i), depth) + kv.first, kv.second);
  return out;
}

}  // namespace fluxtrain
