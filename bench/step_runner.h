// How the benchmark (and later the trainer) issues a training step on the device.
// FLUX's 57 blocks cost ~20k kernel launches per LoRA step; at the seed's sizes the host cannot
// issue them as fast as the GPU runs them. A CUDA graph captures the whole step (forward,
// backward, AdamW) once and replays it with one launch: shapes are static because EasyControl
// trains at fixed cond_size/noise_size.
#pragma once
#include <functional>
#include <memory>
#include <string>

namespace fluxtrain {

class StepRunner {
 public:
  virtual ~StepRunner() = default;
  virtual void run() = 0;
  virtual std::string mode() const = 0;
};

// Plain eager execution.
std::unique_ptr<StepRunner> make_eager_runner(std::function<void()> step);
// CUDA graph of `step` (after `warmup` eager runs on the capture stream). Returns nullptr when
// this build has no CUDA; throws when capture fails.
std::unique_ptr<StepRunner> make_cuda_graph_runner(std::function<void()> step, int warmup);

}  // namespace fluxtrain
