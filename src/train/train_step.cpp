#include "train/train_step.h"

#include <ATen/ATen.h>

#include "model/flux_transformer.h"
#include "train/flow_matching.h"

namespace fluxtrain {

at::Tensor flow_loss_sum(const FluxConfig& cfg, BlockWeights& weights, const LoraSet* lora, const FluxInputs& in,
                         const at::Tensor& target, bool gradient_checkpointing) {
  ForwardOptions fo;
  fo.gradient_checkpointing = gradient_checkpointing;
  const at::Tensor pred = flux_forward(cfg, weights, lora, in, fo);
  return per_sample_mse(pred, target).sum();
}

}  // namespace fluxtrain
