// Encoder rank: one rank computes per-sample conditioning for the whole global batch and
// scatters each rank its samples' part; with a trainable encoder, it also gathers the
// gradients with respect to that conditioning back and runs the encoder's backward.
//
// Generic: samples are TensorMaps (any keys, dtypes, shapes; sizes may differ per sample and
// the number of samples per rank may differ, zero included). The module is a function from the
// global batch's inputs (rank 0's samples first, then rank 1's, ...) to one output map per
// sample. The encoders issue plugs CLIP/T5/VAE in as such a function.
#pragma once
#include <functional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"

namespace fluxtrain::dist {

class Communicator;

using SampleMaps = std::vector<TensorMap>;
using EncodeFn = std::function<SampleMaps(const SampleMaps& global_inputs)>;

class EncoderRank {
 public:
  // device: where tensors travel and where the outputs land on every rank (the communicator's
  // device kind: CPU for MPI, the rank's GPU for NCCL).
  EncoderRank(Communicator& comm, int encoder_rank = 0, at::Device device = at::kCPU);

  int encoder_rank() const { return encoder_rank_; }
  bool is_encoder() const;

  // Collective. Every rank passes its samples' inputs; the encoder rank runs `encode` once on
  // the global batch (other ranks never call it) and every rank gets its samples' outputs.
  // requires_grad: the encoder rank keeps the outputs' graph for backward(), and the returned
  // tensors are leaves that require grad (so the caller's backward fills their .grad()).
  SampleMaps forward(const SampleMaps& local_inputs, const EncodeFn& encode, bool requires_grad = false);

  // Collective, after forward(requires_grad=true) and each rank's own backward: every rank
  // passes d loss / d output for its samples (e.g. the .grad() of what forward returned;
  // missing keys or undefined tensors count as zero). The encoder rank back-propagates
  // scale * grads through the kept graph, so its encoder parameters receive the gradient of
  // scale * sum over ranks of the ranks' losses (scale = 1 / world for a mean over ranks).
  void backward(const SampleMaps& local_grads, double scale = 1.0);

  // Convenience for backward(): the .grad() of forward's outputs.
  static SampleMaps grads_of(const SampleMaps& outputs);

 private:
  Communicator& comm_;
  int encoder_rank_;
  at::Device device_;
  std::vector<SampleMaps> kept_;  // encoder rank: outputs with graph, per rank
};

}  // namespace fluxtrain::dist
