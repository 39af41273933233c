// CUDA graphs of the training step (GPU build only; train/step_graphs.h).
#include <map>

#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/error.h"
#include "train/step_graphs.h"

namespace fluxtrain {
namespace {

class CudaStepGraphs final : public StepGraphs {
 public:
  explicit CudaStepGraphs(c10::Device device)
      : device_(device), side_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index())) {}

  void run(const std::string& key, const std::function<void()>& fn) override {
    c10::cuda::CUDAGuard dg(device_);
    Piece& p = pieces_[key];
    if (p.graph) {
      p.graph->replay();
      return;
    }
    const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream(device_.index());
    join(main, side_);  // the side stream sees what main queued (input copies)
    if (!p.warm) {
      {
        c10::cuda::CUDAStreamGuard sg(side_);
        fn();
      }
      join(side_, main);
      p.warm = true;
      return;
    }
    // What the warm-up left in the caching allocator would sit beside the graph's own pool:
    // give it back first, so that a captured step costs about what an eager one does.
    side_.synchronize();
    c10::cuda::CUDACachingAllocator::emptyCache();
    auto g = std::make_unique<at::cuda::CUDAGraph>();
    try {
      c10::cuda::CUDAStreamGuard sg(side_);
      // Thread-local capture: the prefetch thread keeps allocating page-locked buffers and
      // querying their events meanwhile, which a global capture would count as an illegal call
      // (and so invalidate the capture). Nothing outside this thread touches the side stream.
      g->capture_begin(pool_set_ ? pool_ : decltype(pool_){0, 0}, cudaStreamCaptureModeThreadLocal);
      try {
        fn();
      } catch (...) {
        try {
          g->capture_end();
        } catch (...) {
        }
        throw;
      }
      g->capture_end();
    } catch (const std::exception& e) {
      throw Error(std::string("CUDA graph capture of the training step failed: ") + e.what());
    }
    if (!pool_set_) {
      pool_ = g->pool();
      pool_set_ = true;
    }
    join(side_, main);
    p.graph = std::move(g);
    p.graph->replay();
  }

  bool captured(const std::string& key) const override {
    auto it = pieces_.find(key);
    return it != pieces_.end() && it->second.graph;
  }
  size_t size() const override { return pieces_.size(); }

 private:
  struct Piece {
    bool warm = false;
    std::unique_ptr<at::cuda::CUDAGraph> graph;
  };
  // `waiter` waits for everything queued on `on` so far.
  static void join(const c10::cuda::CUDAStream& on, const c10::cuda::CUDAStream& waiter) {
    at::cuda::CUDAEvent ev;
    ev.record(on);
    ev.block(waiter);
  }

  c10::Device device_;
  c10::cuda::CUDAStream side_;
  std::map<std::string, Piece> pieces_;
  c10::MempoolId_t pool_{0, 0};
  bool pool_set_ = false;
};

}  // namespace

std::unique_ptr<StepGraphs> make_step_graphs(c10::Device device) {
  if (!device.is_cuda()) return nullptr;
  if (device.index() < 0) device = c10::Device(c10::kCUDA, 0);
  return std::make_unique<CudaStepGraphs>(device);
}

}  // namespace fluxtrain
