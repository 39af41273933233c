// A text encoder's frozen weights as a BlockWeights provider (one "block" per encoder layer,
// resident), so that the encoders run their layers through model/block_runner.h and get the
// same activation checkpointing as the transformer.
#pragma once
#include <vector>

#include "model/block_weights.h"

namespace fluxtrain {

class EncoderLayerWeights : public BlockWeights {
 public:
  TensorMap globals_;              // embeddings, final norm, ... (full HF names)
  std::vector<TensorMap> layers_;  // per layer, names relative to the layer's prefix
  const TensorMap& globals() override { return globals_; }
  int num_blocks() const override { return static_cast<int>(layers_.size()); }
  const TensorMap& acquire(int layer) override { return layers_.at(static_cast<size_t>(layer)); }
  void release(int) override {}
};

}  // namespace fluxtrain
