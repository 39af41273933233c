// The model part of one training step, shared by the trainer and `fluxtrain bench`: the
// transformer on prepared inputs and the flow-matching loss, summed over the samples (per-sample
// mean squared error of the prediction against noise - x). Returns a tensor with its graph; no
// host synchronisation, so that the step can be captured as a CUDA graph.
#pragma once
#include <ATen/core/Tensor.h>

namespace fluxtrain {

struct FluxConfig;
struct FluxInputs;
class BlockWeights;
class LoraSet;

at::Tensor flow_loss_sum(const FluxConfig& cfg, BlockWeights& weights, const LoraSet* lora, const FluxInputs& in,
                         const at::Tensor& target, bool gradient_checkpointing);

}  // namespace fluxtrain
