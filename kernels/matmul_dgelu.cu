// cuBLASLt's DGELU epilogue for kernels/matmul_dgelu.h. Row-major operands are handed to
// cuBLASLt (column-major) as their transposes, so the product computed is
//   dpre^T [N, M] = w^T [N, O] (w's memory, ld = w's row stride) x dy^T [O, M] (dy's, ld = its row
//   stride), with pre^T [N, M] (pre's memory) as the epilogue's auxiliary input.
// The aux's data type is left at its default (the output's), the workspace and handle are
// LibTorch's (the ones its own cuBLASLt calls use on this stream).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>

#include "kernels/matmul_dgelu.h"

namespace fluxtrain::kernels {
namespace {

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

// Owners of the cuBLASLt descriptors (destroyed on every path out).
struct Desc {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Desc() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

at::Tensor matmul_dgelu_cuda(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& pre) {
  const int64_t M = dy.size(0), O = dy.size(1), N = w.size(1);
  const cudaDataType_t dt = cuda_type(dy.scalar_type());
  at::Tensor out = at::empty({M, N}, dy.options());
  Desc d;
  bool ok = cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS;
  const cublasOperation_t no = CUBLAS_OP_N;
  const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DGELU;
  const void* aux = pre.data_ptr();
  const int64_t aux_ld = pre.stride(0);
  ok = ok && cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &no, sizeof(no)) == CUBLAS_STATUS_SUCCESS;
  ok = ok && cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &no, sizeof(no)) == CUBLAS_STATUS_SUCCESS;
  ok = ok && cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)) ==
                 CUBLAS_STATUS_SUCCESS;
  ok = ok && cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)) ==
                 CUBLAS_STATUS_SUCCESS;
  ok = ok && cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)) ==
                 CUBLAS_STATUS_SUCCESS;
  ok = ok && cublasLtMatrixLayoutCreate(&d.a, dt, N, O, w.stride(0)) == CUBLAS_STATUS_SUCCESS;
  ok = ok && cublasLtMatrixLayoutCreate(&d.b, dt, O, M, dy.stride(0)) == CUBLAS_STATUS_SUCCESS;
  ok = ok && cublasLtMatrixLayoutCreate(&d.d, dt, N, M, N) == CUBLAS_STATUS_SUCCESS;
  size_t ws_size = at::cuda::getCUDABlasLtWorkspaceSize();
  void* ws = at::cuda::getCUDABlasLtWorkspace();
  ok = ok && cublasLtMatmulPreferenceCreate(&d.pref) == CUBLAS_STATUS_SUCCESS;
  ok = ok && cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_size,
                                                  sizeof(ws_size)) == CUBLAS_STATUS_SUCCESS;
  if (!ok) return {};
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  if (cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.a, d.b, d.d, d.d, d.pref, 1, &heur, &found) !=
          CUBLAS_STATUS_SUCCESS ||
      found == 0)
    return {};
  const float alpha = 1.f, beta = 0.f;
  const cublasStatus_t st =
      cublasLtMatmul(handle, d.op, &alpha, w.data_ptr(), d.a, dy.data_ptr(), d.b, &beta, out.data_ptr(), d.d,
                     out.data_ptr(), d.d, &heur.algo, ws, ws_size, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "matmul_dgelu: cublasLtMatmul failed with status ", static_cast<int>(st));
  return out;
}

}  // namespace fluxtrain::kernels
