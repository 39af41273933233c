// CUDA graphs of the training step (`fluxtrain train --cuda_graph`).
//
// FLUX's 57 blocks cost ~20k kernel launches per LoRA step; issued one by one from the host the
// eager step is host-bound at the small sizes (~300 ms whatever the size on an H200). A graph
// replays a whole micro-step (forward, loss, backward into the LoRA gradients) or the update
// (clipping + AdamW, train/optimizer.h step_on_device) with one launch.
//
// The trainer names each piece by what fixes its shapes (the update; a micro-step per shape of
// samples, so that bucketed datasets get one graph per bucket) and keeps that piece's inputs in
// static tensors it refills before each run. run(key, fn):
//   1st call  fn runs eagerly on a side stream: the warm-up that creates lazily made state
//             (cuBLAS workspaces, autograd's stream bookkeeping) outside the capture;
//   2nd call  fn is captured, then replayed;
//   later     replayed.
// All graphs share one memory pool: they run one after another on one stream, and what crosses
// from one to the next (gradients, the loss and norm tensors) is allocated outside the pool.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include <c10/core/Device.h>

namespace fluxtrain {

class StepGraphs {
 public:
  virtual ~StepGraphs() = default;
  // Throws fluxtrain::Error when the capture fails (the capture is ended, nothing ran; the
  // caller may run fn eagerly instead).
  virtual void run(const std::string& key, const std::function<void()>& fn) = 0;
  virtual bool captured(const std::string& key) const = 0;
  virtual size_t size() const = 0;  // pieces seen (warmed up or captured)
};

// Null in a build without CUDA or for a non-CUDA device.
std::unique_ptr<StepGraphs> make_step_graphs(c10::Device device);

}  // namespace fluxtrain
