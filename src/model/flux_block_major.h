// Block-major gradient accumulation (issue 14, point 3): the k micro-batches of one optimizer
// step go through the transformer block by block -- block i runs for micro-batch 1..k while it
// is acquired, then block i + 1 -- so a streamed (or gathered, or dequantised) block crosses
// PCIe once per k micro-batches instead of k times. The providers' own caching makes the k
// consecutive acquires of a block free after the first.
//
// Backward follows: summing the k losses and calling backward() once, autograd's ready queue
// runs the most recently created node first, and block i's nodes of all micro-batches were
// created one after another, so backward is block-major too (tests/unit/test_block_major.cpp
// counts the copies).
//
// Cost: the activations kept for backward are those of k micro-batches at once (with
// --gradient_checkpointing: k times the block inputs), which is why it is opt-in.
// Gradients equal the ordinary order's (float64 test, 1e-12): the same operations, in another
// order of independent graphs; only the accumulation order of LoRA gradients differs.
//
// The embedding and final-layer code mirrors flux_forward (model/flux_transformer.cpp); if that
// function is split into stages, both should share them.
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/flux_transformer.h"

namespace fluxtrain {

// One output per micro-batch, as flux_forward would return for each alone.
std::vector<at::Tensor> flux_forward_block_major(const FluxConfig& cfg, BlockWeights& weights, const LoraSet* lora,
                                                 const std::vector<FluxInputs>& micro_batches,
                                                 const ForwardOptions& opt = {});

}  // namespace fluxtrain
