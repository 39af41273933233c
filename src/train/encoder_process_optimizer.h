// The optimizer of a run whose text-encoder LoRA lives on --encoder_process only
// (train/encoder_process.h).
//   transformer LoRA   the run's ordinary optimizer (replicated after GradSync, or sharded), the
//                      same on every rank;
//   text-encoder LoRA  a replicated AdamW on the encoder process alone, at --text_encoder_lr. Its
//                      gradients arrive already summed over the ranks (the encoder backward of the
//                      gathered output gradients), so they never pass GradSync.
// Clipping uses one global norm over both, sqrt(transformer^2 + text encoder^2): the text
// encoder's part is all-reduced from the encoder process, so every rank takes the same skip
// decision and the same coefficient, as one process with all groups in one optimizer does.
// State: the keys of that one-process optimizer (exp_avg.<i> over the transformer's parameters,
// then the text encoders'), gathered to rank 0, so that a checkpoint resumes on any rank count.
#pragma once
#include <memory>
#include <vector>

#include "train/optimizer.h"

namespace fluxtrain {

// main: the transformer's optimizer over main_params parameters. te_groups: the text-encoder
// LoRA groups on the encoder process, empty on every other rank. Collective: step, state.
std::unique_ptr<Optimizer> make_encoder_process_optimizer(dist::Communicator& ctl, int encoder_rank,
                                                          std::unique_ptr<Optimizer> main, size_t main_params,
                                                          std::vector<ParamGroup> te_groups, const AdamWConfig& cfg);

// Collective: the map held by rank `from` arrives on rank 0; every other rank gets an empty map.
TensorMap send_to_root(dist::Communicator& comm, int from, const TensorMap& m);

}  // namespace fluxtrain
