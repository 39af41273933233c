// CUDA plumbing of the block-streaming provider (GPU build only): page-locked host buffers of
// exactly the requested size (cudaHostAlloc: PyTorch's caching host allocator would round each
// block up to a power of two), copies on one side stream, per-slot events.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "dist/offloaded_weights.h"

namespace fluxtrain::dist {
namespace {

at::Tensor pinned_bytes(int64_t bytes) {
  void* p = nullptr;
  const cudaError_t e = cudaHostAlloc(&p, static_cast<size_t>(bytes), cudaHostAllocDefault);
  if (e != cudaSuccess)
    throw Error("block streaming: cannot page-lock " + std::to_string(bytes >> 20) + " MiB of host memory (" +
                cudaGetErrorString(e) + "); lower --blocks_to_swap or free host memory");
  return at::from_blob(p, {bytes}, [](void* q) { cudaFreeHost(q); }, at::TensorOptions().dtype(at::kByte));
}

class CudaStreamEngine : public StreamEngine {
 public:
  CudaStreamEngine(c10::Device device, int num_slots)
      : device_(device.has_index() ? device : c10::Device(c10::kCUDA, c10::cuda::current_device())),
        side_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index())) {
    filled_.resize(num_slots);
    released_.resize(num_slots);
  }
  ~CudaStreamEngine() override {
    try {
      side_.synchronize();
    } catch (...) {
    }
  }
  at::Tensor host_buffer(int64_t bytes) override { return pinned_bytes(bytes); }
  at::Tensor device_buffer(int64_t bytes) override {
    return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device_));
  }
  void copy_to_slot(int slot, void* dst, const void* src, int64_t bytes) override {
    c10::cuda::CUDAGuard guard(device_);
    released_[slot].block(side_);  // the slot's previous readers are done (no-op if never recorded)
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, side_.stream()));
    filled_[slot].record(side_);
  }
  void slot_released(int slot) override {
    c10::cuda::CUDAGuard guard(device_);
    released_[slot].record(c10::cuda::getCurrentCUDAStream(device_.index()));
  }
  void wait_filled(int slot) override {
    c10::cuda::CUDAGuard guard(device_);
    filled_[slot].block(c10::cuda::getCurrentCUDAStream(device_.index()));
  }
  void synchronize() override { side_.synchronize(); }
  void after_copy(int, const std::function<void()>& enqueue) override {
    c10::cuda::CUDAStreamGuard guard(side_);
    enqueue();
  }

 private:
  c10::Device device_;
  c10::cuda::CUDAStream side_;
  std::vector<at::cuda::CUDAEvent> filled_, released_;
};

}  // namespace

std::unique_ptr<StreamEngine> make_cuda_stream_engine(c10::Device device, int num_slots) {
  return std::make_unique<CudaStreamEngine>(device, num_slots);
}

double measure_host_to_device_bandwidth(c10::Device device, int64_t bytes, int reps) {
  if (!device.is_cuda() || !at::hasCUDA()) return 0;
  c10::cuda::CUDAGuard guard(device);
  at::Tensor host = pinned_bytes(bytes);
  std::memset(host.data_ptr(), 1, static_cast<size_t>(bytes));
  at::Tensor dev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  double best = 0;
  for (int r = 0; r < std::max(reps, 1) + 1; ++r) {  // the first copy warms up
    at::cuda::CUDAEvent a(cudaEventDefault), b(cudaEventDefault);
    a.record(stream);
    C10_CUDA_CHECK(cudaMemcpyAsync(dev.data_ptr(), host.data_ptr(), static_cast<size_t>(bytes),
                                   cudaMemcpyHostToDevice, stream.stream()));
    b.record(stream);
    b.synchronize();
    const double s = a.elapsed_time(b) / 1e3;
    if (r > 0 && s > 0) best = std::max(best, static_cast<double>(bytes) / s);
  }
  return best;
}

}  // namespace fluxtrain::dist
