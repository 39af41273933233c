// Probe: how much a per-shape algorithm search would gain over cuBLASLt's first heuristic choice
// on the GEMMs of a FLUX LoRA step (issue 15). For each shape it asks cuBLASLt for up to 16
// candidate algorithms, times each (CUDA events, mean of 20 runs after 3 warm-up runs) and prints a
// JSON line: the first heuristic's time, the best time and which candidate it was.
// Session 17 on the H200: 3.9% less over the base-weight shapes in isolation, none of it in the
// step (docs/benchmarks.md).
// Build and run on the device (no fluxtrain code involved):
//   nvcc -O2 -std=c++17 -arch=sm_90 bench/probe_cublaslt_algos.cu -lcublasLt -o /tmp/probe && /tmp/probe
// Shapes are named in row-major terms: "fwd" is y[M,N] = x[M,K] W[N,K]^T, "dx" is dx[M,K] = dy[M,N] W[N,K],
// "wgrad" is g[N,K] = dy[M,N]^T x[M,K] (the adapters' weight gradients).
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CHECK_CUDA(x)                                                                  \
  do {                                                                                 \
    cudaError_t e = (x);                                                               \
    if (e != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)
#define CHECK_LT(x)                                                               \
  do {                                                                            \
    cublasStatus_t s = (x);                                                       \
    if (s != CUBLAS_STATUS_SUCCESS) {                                             \
      std::fprintf(stderr, "%s:%d cublasLt status %d\n", __FILE__, __LINE__, (int)s); \
      std::exit(1);                                                               \
    }                                                                             \
  } while (0)

__global__ void fill(__nv_bfloat16* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    p[i] = __float2bfloat16(((h & 0xffff) / 65536.0f - 0.5f) * 0.1f);
  }
}

struct Buffers {
  __nv_bfloat16 *a = nullptr, *b = nullptr, *d = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
};

// Column-major D[m,n] = op(A) op(B); row-major shapes are mapped onto this in main().
static void probe(cublasLtHandle_t lt, Buffers& buf, const std::string& name, int M, int N, int K,
                  cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, double flops) {
  cublasLtMatmulDesc_t op;
  CHECK_LT(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  CHECK_LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CHECK_LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const int ar = ta == CUBLAS_OP_N ? m : k, ac = ta == CUBLAS_OP_N ? k : m;
  const int br = tb == CUBLAS_OP_N ? k : n, bc = tb == CUBLAS_OP_N ? n : k;
  cublasLtMatrixLayout_t la, lb, ld;
  CHECK_LT(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, ar, ac, ar));
  CHECK_LT(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, br, bc, br));
  CHECK_LT(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, m, n, m));
  const float alpha = 1.f, beta = 0.f;
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  for (size_t ws_mib : {size_t(4), size_t(32)}) {
    cublasLtMatmulPreference_t pref;
    CHECK_LT(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = ws_mib << 20;
    CHECK_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    cublasLtMatmulHeuristicResult_t res[16];
    int count = 0;
    CHECK_LT(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, ld, ld, pref, 16, res, &count));
    std::vector<double> ms;
    for (int i = 0; i < count; ++i) {
      auto run = [&] {
        return cublasLtMatmul(lt, op, &alpha, buf.a, la, buf.b, lb, &beta, buf.d, ld, buf.d, ld, &res[i].algo, buf.ws, ws,
                              nullptr);
      };
      if (run() != CUBLAS_STATUS_SUCCESS) {
        ms.push_back(1e9);
        continue;
      }
      for (int w = 0; w < 2; ++w) run();
      CHECK_CUDA(cudaEventRecord(e0));
      for (int r = 0; r < 20; ++r) run();
      CHECK_CUDA(cudaEventRecord(e1));
      CHECK_CUDA(cudaEventSynchronize(e1));
      float t = 0;
      CHECK_CUDA(cudaEventElapsedTime(&t, e0, e1));
      ms.push_back(t / 20.0);
    }
    CHECK_LT(cublasLtMatmulPreferenceDestroy(pref));
    if (ms.empty()) continue;
    const int best = int(std::min_element(ms.begin(), ms.end()) - ms.begin());
    std::printf(
        "{\"shape\": \"%s\", \"M\": %d, \"N\": %d, \"K\": %d, \"workspace_mib\": %zu, \"candidates\": %d, "
        "\"first_ms\": %.4f, \"best_ms\": %.4f, \"best_index\": %d, \"first_tflops\": %.0f, \"best_tflops\": %.0f}\n",
        name.c_str(), M, N, K, ws_mib, count, ms[0], ms[best], best, flops / ms[0] / 1e9, flops / ms[best] / 1e9);
    std::fflush(stdout);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(ld);
  cublasLtMatmulDescDestroy(op);
}

int main() {
  cublasLtHandle_t lt;
  CHECK_LT(cublasLtCreate(&lt));
  Buffers buf;
  const size_t elems = size_t(5632) * 21504;  // the largest operand: all rows x linear1's outputs
  CHECK_CUDA(cudaMalloc(&buf.a, elems * 2));
  CHECK_CUDA(cudaMalloc(&buf.b, elems * 2));
  CHECK_CUDA(cudaMalloc(&buf.d, elems * 2));
  CHECK_CUDA(cudaMalloc(&buf.ws, size_t(32) << 20));
  fill<<<1024, 256>>>(buf.a, elems, 1);
  fill<<<1024, 256>>>(buf.b, elems, 2);
  CHECK_CUDA(cudaDeviceSynchronize());
  struct W { const char* name; int in, out; };
  const W weights[] = {{"qkv", 3072, 9216}, {"proj", 3072, 3072}, {"mlp_up", 3072, 12288},
                       {"mlp_down", 12288, 3072}, {"linear1", 3072, 21504}, {"linear2", 15360, 3072}};
  const int rows[] = {512, 1024, 4096, 4608, 5632};
  for (const W& w : weights) {
    for (int M : rows) {
      const double f = 2.0 * M * w.in * w.out;
      // fwd: y[M,out] = x[M,in] W[out,in]^T  ->  column-major y'[out,M] = W'^T x'
      probe(lt, buf, std::string(w.name) + "_fwd", M, w.out, w.in, CUBLAS_OP_T, CUBLAS_OP_N, w.out, M, w.in, f);
      // dx: dx[M,in] = dy[M,out] W[out,in]  ->  dx'[in,M] = W' dy'
      probe(lt, buf, std::string(w.name) + "_dx", M, w.in, w.out, CUBLAS_OP_N, CUBLAS_OP_N, w.in, M, w.out, f);
    }
  }
  // The adapters' products at ranks 32 and 128 on 4608 rows (plain LoRA at 1024 px).
  for (int r : {32, 128}) {
    const int M = 4608;
    for (int io : {3072, 12288}) {
      const double f = 2.0 * M * io * r;
      const std::string s = "_r" + std::to_string(r) + "_" + std::to_string(io);
      probe(lt, buf, "lora_down_fwd" + s, M, r, io, CUBLAS_OP_T, CUBLAS_OP_N, r, M, io, f);
      probe(lt, buf, "lora_up_fwd" + s, M, io, r, CUBLAS_OP_T, CUBLAS_OP_N, io, M, r, f);
      probe(lt, buf, "lora_dh" + s, M, r, io, CUBLAS_OP_N, CUBLAS_OP_N, r, M, io, f);
      // wgrad: g[out,in] = dy[M,out]^T x[M,in]  ->  g'[in,out] = x' dy'^T
      probe(lt, buf, "lora_wgrad_down" + s, M, r, io, CUBLAS_OP_N, CUBLAS_OP_T, io, r, M, f);
      probe(lt, buf, "lora_wgrad_up" + s, M, io, r, CUBLAS_OP_N, CUBLAS_OP_T, r, io, M, f);
    }
  }
  cublasLtDestroy(lt);
  return 0;
}
