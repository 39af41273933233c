// Runs one transformer block with its frozen weights acquired just in time, and makes that
// work under autograd:
//  * plain: weights resident and no checkpointing -> the block runs inline, autograd as usual;
//  * recompute (--gradient_checkpointing): forward runs without a graph and keeps only the
//    block's inputs (and its attention results, model/recompute.h); backward re-acquires the
//    weights, recomputes the block with a graph, skipping what model/recompute.h lets it skip,
//    and back-propagates through it. LibTorch's C++ API has no checkpoint helper, so this is a
//    custom autograd node.
//  * transient weights without recompute (sharded/offloaded providers): forward keeps the
//    block's graph; backward re-acquires the weights (the provider refills the same tensors)
//    before running the stored graph.
// In both wrapped modes the node returns gradients for the block inputs and the LoRA params.
#pragma once
#include <functional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/block_weights.h"

namespace fluxtrain {

using BlockFn = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>& acts, const TensorMap& w)>;

// acts: the block's tensor inputs (all defined); params: LoRA tensors the block reads.
std::vector<at::Tensor> run_block(BlockWeights& weights, int block, const BlockFn& fn,
                                  const std::vector<at::Tensor>& acts, const std::vector<at::Tensor>& params,
                                  bool recompute);

}  // namespace fluxtrain
