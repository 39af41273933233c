// CUDA-graph step runner (GPU build only).
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "bench/step_runner.h"

namespace fluxtrain {
namespace {

class CudaGraphRunner : public StepRunner {
 public:
  CudaGraphRunner(std::function<void()> step, int warmup) : step_(std::move(step)) {
    // Capture must happen on a side stream; warm-up runs there first so that lazily created
    // state (cuBLAS workspaces, autograd's device threads, allocator blocks) exists already.
    stream_ = c10::cuda::getStreamFromPool();
    stream_.synchronize();
    c10::cuda::getCurrentCUDAStream().synchronize();
    {
      c10::cuda::CUDAStreamGuard guard(stream_);
      for (int i = 0; i < warmup; ++i) step_();
      stream_.synchronize();
      graph_.capture_begin();
      step_();
      graph_.capture_end();
    }
    stream_.synchronize();
  }
  void run() override { graph_.replay(); }
  std::string mode() const override { return "cuda_graph"; }

 private:
  std::function<void()> step_;
  c10::cuda::CUDAStream stream_ = c10::cuda::getDefaultCUDAStream();
  at::cuda::CUDAGraph graph_;
};

}  // namespace

std::unique_ptr<StepRunner> make_cuda_graph_runner(std::function<void()> step, int warmup) {
  return std::make_unique<CudaGraphRunner>(std::move(step), warmup);
}

}  // namespace fluxtrain
