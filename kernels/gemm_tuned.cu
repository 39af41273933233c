// The cuBLASLt path of kernels/gemm_tuned.h. A row-major product out[M, N] = a[M, K] b[K, N] is
// handed to cuBLASLt (column-major) as out^T[N, M] = b^T a^T: cuBLASLt's A is b's memory, its B is
// a's, its D is out's (leading dimension out's row stride), so no operand is copied or transposed.
// Each distinct shape gets a plan (descriptors and the chosen algorithm) kept for the process;
// the handle and workspace are LibTorch's (the ones its own cuBLASLt calls use on the stream).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cublasLt.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "kernels/gemm_tuned.h"

namespace fluxtrain::kernels {
namespace {

constexpr int kCandidates = 16;  // what the heuristic is asked for when tuning
constexpr int kTimedRuns = 3;    // per candidate, after one untimed run

void check(cublasStatus_t s, const char* what) {
  TORCH_CHECK(s == CUBLAS_STATUS_SUCCESS, "gemm_tuned: ", what, " failed with cuBLAS status ", static_cast<int>(s));
}

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

struct State {
  std::mutex mu;
  std::unordered_map<std::string, std::unique_ptr<Plan>> plans;
  bool file_read = false;
  std::string device, path;
  std::map<std::string, GemmAlgoWords> recorded;  // this device's choices in the tuning file
  GemmTuningStats stats;
  bool warned = false;
};

// Never destroyed: plans may be used until the process exits.
State& state() {
  static State* s = new State;
  return *s;
}

int alignment(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  int al = 1;
  while (al < 256 && v % (al * 2) == 0) al *= 2;
  return al;
}

// The GPU, its SM count and the cuBLASLt version: what a recorded choice is valid for.
std::string device_signature() {
  const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
  std::string name = p->name;
  for (char& c : name)
    if (c == '|' || c == '\n') c = '_';
  return name + " sm" + std::to_string(p->major) + std::to_string(p->minor) + " x" +
         std::to_string(p->multiProcessorCount) + " cublasLt" + std::to_string(cublasLtGetVersion());
}

GemmAlgoWords words_of(const cublasLtMatmulAlgo_t& algo) {
  static_assert(sizeof(cublasLtMatmulAlgo_t) == sizeof(GemmAlgoWords), "cublasLtMatmulAlgo_t is 8 words");
  GemmAlgoWords w;
  std::memcpy(w.data(), &algo, sizeof w);
  return w;
}

cublasLtMatmulAlgo_t algo_of(const GemmAlgoWords& w) {
  cublasLtMatmulAlgo_t algo;
  std::memcpy(&algo, w.data(), sizeof algo);
  return algo;
}

}  // namespace

void gemm_cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha,
               const at::Tensor& bias) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  bool ta = false, tb = false;
  int64_t lda = 0, ldb = 0;
  TORCH_CHECK(gemm_operand_layout(a, ta, lda) && gemm_operand_layout(b, tb, ldb), "gemm_tuned: unsupported strides");
  const int64_t ldd = M == 1 ? N : out.stride(0);
  const bool half = a.scalar_type() == at::kHalf;
  const cudaDataType_t dt = half ? CUDA_R_16F : CUDA_R_16BF;
  const bool with_bias = bias.defined();
  const bool reads_c = beta != 0.0;
  const int al_a = alignment(a.data_ptr()), al_b = alignment(b.data_ptr()), al_d = alignment(out.data_ptr());
  char keybuf[200];
  std::snprintf(keybuf, sizeof keybuf, "%s %c%c m%lld n%lld k%lld ld%lld,%lld,%lld al%d,%d,%d%s%s",
                half ? "f16" : "bf16", tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<long long>(N),
                static_cast<long long>(M), static_cast<long long>(K), static_cast<long long>(ldb),
                static_cast<long long>(lda), static_cast<long long>(ldd), al_b, al_a, al_d, reads_c ? " c" : "",
                with_bias ? " bias" : "");
  const std::string key = std::to_string(a.get_device()) + " " + keybuf;
  const std::string file_key = keybuf;

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  void* ws = at::cuda::getCUDABlasLtWorkspace();
  const size_t ws_size = at::cuda::getCUDABlasLtWorkspaceSize();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);

  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  auto it = st.plans.find(key);
  if (it == st.plans.end()) {
    auto plan = std::make_unique<Plan>();
    // cuBLASLt's A is b (m = N rows of out^T), its B is a.
    const cublasOperation_t opA = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opB = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    check(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &opA, sizeof opA), "TRANSA");
    check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &opB, sizeof opB), "TRANSB");
    if (with_bias) {
      const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi), "EPILOGUE");
    }
    check(cublasLtMatrixLayoutCreate(&plan->a, dt, tb ? K : N, tb ? N : K, ldb), "layout A");
    check(cublasLtMatrixLayoutCreate(&plan->b, dt, ta ? M : K, ta ? K : M, lda), "layout B");
    check(cublasLtMatrixLayoutCreate(&plan->d, dt, N, M, ldd), "layout D");
    if (with_bias) {
      const void* bp = bias.data_ptr();
      check(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof bp), "BIAS");
    }

    if (!st.file_read) {
      st.file_read = true;
      st.device = device_signature();
      st.path = gemm_tuning_file();
      st.recorded = read_gemm_tuning(st.path, st.device);
    }
    bool chosen = false;
    // A recorded choice, if cuBLASLt still accepts it for this shape.
    if (auto rec = st.recorded.find(file_key); rec != st.recorded.end()) {
      plan->algo = algo_of(rec->second);
      cublasLtMatmulHeuristicResult_t r{};
      chosen = cublasLtMatmulAlgoCheck(handle, plan->op, plan->a, plan->b, plan->d, plan->d, &plan->algo, &r) ==
                   CUBLAS_STATUS_SUCCESS &&
               r.workspaceSize <= ws_size;
      if (chosen) ++st.stats.from_file;
    }
    if (!chosen) {
      cublasLtMatmulPreference_t pref = nullptr;
      check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
      std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, decltype(&cublasLtMatmulPreferenceDestroy)>
          pref_owner(pref, &cublasLtMatmulPreferenceDestroy);
      size_t ws_pref = ws_size;
      check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_pref,
                                                 sizeof ws_pref),
            "MAX_WORKSPACE_BYTES");
      const uint32_t ua = al_b, ub = al_a, ud = al_d;  // cuBLASLt's A is b
      check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &ua, sizeof ua),
            "ALIGNMENT_A");
      check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ub, sizeof ub),
            "ALIGNMENT_B");
      check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ud, sizeof ud),
            "ALIGNMENT_C");
      check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ud, sizeof ud),
            "ALIGNMENT_D");
      // LibTorch's setting for reduced-precision split-K reductions, as its own GEMMs honour it.
      const auto red = half ? at::globalContext().allowFP16ReductionCuBLAS()
                            : at::globalContext().allowBF16ReductionCuBLAS();
      if (red != at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK) {
        const uint32_t mask = red == at::CuBLASReductionOption::DisallowReducedPrecisionAllowSplitK
                                  ? (CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE)
                                  : CUBLASLT_REDUCTION_SCHEME_NONE;
        check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask,
                                                   sizeof mask),
              "REDUCTION_SCHEME_MASK");
      }
      const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
      const bool tune = gemm_tuning() == GemmTuning::Tune && !capturing;
      cublasLtMatmulHeuristicResult_t res[kCandidates] = {};
      int found = 0;
      check(cublasLtMatmulAlgoGetHeuristic(handle, plan->op, plan->a, plan->b, plan->d, plan->d, pref,
                                           tune ? kCandidates : 1, res, &found),
            "cublasLtMatmulAlgoGetHeuristic");
      TORCH_CHECK(found > 0, "gemm_tuned: cuBLASLt has no algorithm for ", file_key);
      int best = 0;
      if (tune && found > 1) {
        // Time each candidate on the real operands. With beta != 0 the timed runs write a scratch
        // D (C stays out, unchanged), so out is written once, below.
        at::Tensor scratch = reads_c ? at::empty({M, ldd}, out.options()) : at::Tensor();
        void* d_ptr = reads_c ? scratch.data_ptr() : out.data_ptr();
        at::cuda::CUDAEvent e0(cudaEventDefault), e1(cudaEventDefault);
        float best_ms = 0;
        best = -1;
        for (int i = 0; i < found; ++i) {
          if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
          auto run = [&] {
            return cublasLtMatmul(handle, plan->op, &alpha_f, b.data_ptr(), plan->a, a.data_ptr(), plan->b, &beta_f,
                                  out.data_ptr(), plan->d, d_ptr, plan->d, &res[i].algo, ws, ws_size, stream);
          };
          if (run() != CUBLAS_STATUS_SUCCESS) continue;
          e0.record(at::cuda::getCurrentCUDAStream());
          for (int r = 0; r < kTimedRuns; ++r) run();
          e1.record(at::cuda::getCurrentCUDAStream());
          e1.synchronize();
          const float ms = e0.elapsed_time(e1);
          if (best < 0 || ms < best_ms) best = i, best_ms = ms;
        }
        TORCH_CHECK(best >= 0, "gemm_tuned: no cuBLASLt candidate ran for ", file_key);
        ++st.stats.tuned;
        plan->algo = res[best].algo;
        st.recorded[file_key] = words_of(plan->algo);
        if (!write_gemm_tuning(st.path, st.device, st.recorded) && !st.warned && !st.path.empty()) {
          st.warned = true;
          std::fprintf(stderr, "fluxtrain: warning: could not write the GEMM tuning file %s (choices kept for this "
                       "run only; FLUXTRAIN_GEMM_TUNING_FILE sets another)\n", st.path.c_str());
        }
      } else {
        ++st.stats.heuristic;
        plan->algo = res[0].algo;
      }
    }
    it = st.plans.emplace(key, std::move(plan)).first;
  }
  Plan& plan = *it->second;
  if (with_bias) {
    const void* bp = bias.data_ptr();
    check(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof bp), "BIAS");
  }
  check(cublasLtMatmul(handle, plan.op, &alpha_f, b.data_ptr(), plan.a, a.data_ptr(), plan.b, &beta_f, out.data_ptr(),
                       plan.d, out.data_ptr(), plan.d, &plan.algo, ws, ws_size, stream),
        "cublasLtMatmul");
}

GemmTuningStats gemm_tuning_stats() {
  std::lock_guard<std::mutex> lock(state().mu);
  return state().stats;
}

void reset_gemm_tuning() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  st.plans.clear();
  st.file_read = false;
  st.recorded.clear();
  st.stats = {};
}

}  // namespace fluxtrain::kernels
