// --block_major_accumulation (docs/memory.md): the k micro-batches of an update go through the
// transformer together, block by block (model/flux_block_major.h), with one backward for all of
// them, so that a streamed, gathered or dequantised block is fetched once per update instead of
// k times. The price is memory: the activations of k micro-batches are alive at once.
//
// Semantics are the ordinary accumulation's (Trainer::accumulate per micro-batch):
//   - the same inputs: each shape group of each micro-batch is prepared by the trainer's own
//     group_inputs (noise and sigma drawn per sample from seed, epoch and sample index);
//   - the same loss: a micro-batch's loss is the mean over its samples, the update's gradient
//     the mean over micro-batches (each group's loss sum enters the backward as
//     sum / (k * samples of its micro-batch), as accumulate's grad_scale / n);
//   - online encoding: begin_online for every micro-batch before the forward (in order), and
//     end_online for every micro-batch after the one backward (in order). Collective under
//     mpirun in the same order on every rank. Refused where that does not compose (below);
//   - non-finite: alone, a non-finite loss skips the backward (the update is skipped anyway);
//     under mpirun every rank runs it, as the collectives inside need every rank;
//   - gradient sync: the one backward is the last of the window, so it averages over the ranks.
// Only the order of floating-point sums differs (float64 test: 1e-12).
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/flux_transformer.h"

namespace fluxtrain {

struct Sample;

// Samples of equal shapes (target and conditions), in order of first appearance: each group is
// one forward (Trainer::accumulate, the device micro-step, the block-major forward).
std::vector<std::vector<const Sample*>> shape_groups(const std::vector<Sample>& samples);

struct RunConfig;
struct OnlineEncoding;

// Flow-matching loss sums (per-sample MSE summed, as flow_loss_sum) of every input, computed in
// one block-major forward; tensors with graph, one per input.
std::vector<at::Tensor> block_major_loss_sums(const FluxConfig& cfg, BlockWeights& weights, const LoraSet* lora,
                                              const std::vector<FluxInputs>& inputs,
                                              const std::vector<at::Tensor>& targets, bool gradient_checkpointing);

// Throws the one-line error of a combination that block-major accumulation does not support:
// a text-encoder LoRA trained on --encoder_process under mpirun (that process takes each
// micro-batch's text gradients back before it encodes the next one).
void check_block_major_accumulation(const RunConfig& cfg, const OnlineEncoding& online);

}  // namespace fluxtrain
