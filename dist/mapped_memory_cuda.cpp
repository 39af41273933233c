// CUDA backend of MappedMemory: the driver's virtual memory management. Physical memory from
// cuMemCreate (pinned to this device), address ranges from cuMemAddressReserve, and
// cuMemMap + cuMemSetAccess to put a piece of an allocation at an address; one allocation may
// be mapped at any number of addresses. This memory is outside PyTorch's caching allocator
// (its statistics do not see it; ShardedWeightsStats counts it).
#include "dist/mapped_memory.h"

#include <string>
#include <vector>

#include <cuda.h>
#include <cuda_runtime.h>

#include "core/error.h"

namespace fluxtrain::dist {
namespace {

class CudaMappedMemory : public MappedMemory {
 public:
  explicit CudaMappedMemory(int device) : device_(device) {
    cudaFree(nullptr);  // makes the device's primary context current for the driver API
    prop_.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop_.location.id = device;
    check(cuMemGetAllocationGranularity(&granularity_, &prop_, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
          "cuMemGetAllocationGranularity");
    access_.location = prop_.location;
    access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  }

  ~CudaMappedMemory() override {
    // No kernel may still read these addresses once they are unmapped.
    cudaSetDevice(device_);
    cudaDeviceSynchronize();
    for (auto& [va, bytes] : mapped_) cuMemUnmap(va, bytes);
    for (auto& [va, bytes] : reserved_) cuMemAddressFree(va, bytes);
    for (CUmemGenericAllocationHandle h : handles_) cuMemRelease(h);
  }

  c10::Device device() const override { return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device_)); }
  size_t granularity() const override { return granularity_; }

  int create(size_t bytes) override {
    CUmemGenericAllocationHandle h;
    const CUresult r = cuMemCreate(&h, bytes, &prop_, 0);
    if (r == CUDA_ERROR_OUT_OF_MEMORY)
      throw Error("sharded weights: out of GPU memory allocating " + std::to_string(bytes >> 20) + " MiB on cuda:" +
                  std::to_string(device_));
    check(r, "cuMemCreate");
    handles_.push_back(h);
    return static_cast<int>(handles_.size()) - 1;
  }

  char* reserve(size_t bytes) override {
    CUdeviceptr va = 0;
    check(cuMemAddressReserve(&va, bytes, granularity_, 0, 0), "cuMemAddressReserve");
    reserved_.emplace_back(va, bytes);
    return reinterpret_cast<char*>(va);
  }

  void map(char* va, size_t bytes, int handle, size_t offset) override {
    if (bytes == 0) return;
    const CUdeviceptr p = reinterpret_cast<CUdeviceptr>(va);
    check(cuMemMap(p, bytes, offset, handles_.at(handle), 0), "cuMemMap");
    mapped_.emplace_back(p, bytes);
    check(cuMemSetAccess(p, bytes, &access_, 1), "cuMemSetAccess");
  }

 private:
  int device_;
  size_t granularity_ = 0;
  CUmemAllocationProp prop_{};
  CUmemAccessDesc access_{};
  std::vector<CUmemGenericAllocationHandle> handles_;
  std::vector<std::pair<CUdeviceptr, size_t>> reserved_, mapped_;

  void check(CUresult r, const char* call) const {
    if (r == CUDA_SUCCESS) return;
    const char* msg = nullptr;
    cuGetErrorString(r, &msg);
    throw Error(std::string("sharded weights: ") + call + " failed on cuda:" + std::to_string(device_) + ": " +
                    (msg ? msg : "unknown error"),
                ErrorKind::Internal);
  }
};

}  // namespace

std::unique_ptr<MappedMemory> make_cuda_mapped_memory(int device_index) {
  return std::make_unique<CudaMappedMemory>(device_index);
}

}  // namespace fluxtrain::dist
