// The one place where a training step's model FLOPs are counted.
#pragma once
#include <vector>

#include "model/flux_config.h"

namespace fluxtrain {

struct StepShape {
  int64_t batch, txt, noise;          // tokens
  std::vector<int64_t> cond;          // tokens per condition
  int64_t rank;                       // LoRA rank (easycontrol, one adapter set per condition)
  bool standard = false;              // --lora_mode standard: adapters on every text and noise token
                                      // (double: q, k, v, proj of both streams; single: linear1 as
                                      // q, k, v, proj_mlp and linear2 as proj_out)
};

// Model FLOPs of one EasyControl LoRA training step (forward + backward), counting a multiply-add
// as 2 FLOPs. Frozen weights get no weight gradients, so:
//   linear layers:  forward 2*N_tok*in*out, backward (input grad only) the same again -> x2
//   attention:      forward 4*Lq*Lk*H per block (QK^T and PV), backward twice that -> x3
//   LoRA:           forward 2*N*(in*r + r*out), backward input + weight grads -> x3
// Recomputation under activation checkpointing is not counted (model, not hardware, FLOPs).
double lora_step_flops(const FluxConfig& cfg, const StepShape& s);

}  // namespace fluxtrain
