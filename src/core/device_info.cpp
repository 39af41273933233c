#include "core/device_info.h"

#include <ATen/Parallel.h>
#ifdef FLUXTRAIN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fluxtrain {

std::string device_name(const c10::Device& d) {
#ifdef FLUXTRAIN_WITH_CUDA
  if (d.is_cuda()) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, d.index() < 0 ? 0 : d.index()) == cudaSuccess) return p.name;
  }
#endif
  return "cpu (" + std::to_string(at::get_num_threads()) + " threads)";
}

}  // namespace fluxtrain
