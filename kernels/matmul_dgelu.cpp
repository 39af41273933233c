#include "kernels/matmul_dgelu.h"

#include <cstdlib>

#include <ATen/ATen.h>

namespace fluxtrain::kernels {

at::Tensor matmul_dgelu_reference(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& pre) {
  return at::gelu_backward(at::mm(dy, w), pre, "tanh");
}

bool matmul_dgelu_cuda_supported(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& pre) {
#ifdef FLUXTRAIN_WITH_CUDA
  const auto dt = dy.scalar_type();
  if (!dy.is_cuda() || !(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat)) return false;
  if (w.scalar_type() != dt || pre.scalar_type() != dt || w.device() != dy.device() || pre.device() != dy.device())
    return false;
  if (dy.dim() != 2 || w.dim() != 2 || pre.dim() != 2 || dy.size(0) == 0 || w.size(1) == 0 || dy.size(1) == 0)
    return false;
  if (dy.size(1) != w.size(0) || pre.size(0) != dy.size(0) || pre.size(1) != w.size(1)) return false;
  for (const at::Tensor* t : {&dy, &w, &pre})
    if (t->stride(1) != 1 || t->stride(0) % 8 != 0 || reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0)
      return false;
  return w.size(1) % 8 == 0;  // the output's leading dimension
#else
  (void)dy, (void)w, (void)pre;
  return false;
#endif
}

bool matmul_dgelu_epilogue_enabled() {
  static const bool enabled = [] {
    const char* e = std::getenv("FLUXTRAIN_DGELU_EPILOGUE");
    return !(e && e[0] == '0');
  }();
  return enabled;
}

at::Tensor matmul_dgelu(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& pre) {
  TORCH_CHECK(dy.dim() == 2 && w.dim() == 2 && pre.dim() == 2 && dy.size(1) == w.size(0) &&
                  pre.size(0) == dy.size(0) && pre.size(1) == w.size(1),
              "matmul_dgelu: dy [M, O], w [O, N] and pre [M, N] expected");
#ifdef FLUXTRAIN_WITH_CUDA
  if (matmul_dgelu_epilogue_enabled() && matmul_dgelu_cuda_supported(dy, w, pre)) {
    at::Tensor out = matmul_dgelu_cuda(dy, w, pre);
    if (out.defined()) return out;
  }
#endif
  return matmul_dgelu_reference(dy, w, pre);
}

}  // namespace fluxtrain::kernels
