// The step's 16-bit GEMMs through cuBLASLt with, per shape, the algorithm that measured fastest.
//
// Why: cuBLAS picks an algorithm by heuristic. Timing the (up to) 16 candidates its heuristic
// offers for each GEMM shape of a FLUX step on the H200 found a faster one for about half the
// shapes, 4-10% faster on the large products of the single blocks and the MLPs, 3.9% less over
// all shapes (bench/probe_cublaslt_algos.cu; docs/benchmarks.md, session 17). LibTorch's own
// tuning (TunableOp) registers only cuBLAS's default on CUDA, so it cannot find those.
//
// How: the first time a shape (dims, layouts, leading dimensions, dtype, alignment, epilogue)
// is met outside a CUDA graph capture, each candidate runs a few times between CUDA events and
// the fastest is kept for the process. Choices are also written to a tuning file, so later
// processes on the same GPU and cuBLASLt version start from them: a resumed run then takes the
// same algorithms, hence the same bits, as the run it continues. A shape first met inside a
// capture takes the heuristic's first choice (timing would need a synchronisation), and is tuned
// when it is next met outside one.
//
// Dispatch (every function): the cuBLASLt path on CUDA for bf16/fp16 operands of one dtype with
// a unit stride in each, an output of the same dtype and a unit column stride; everything else
// (the CPU, float32, float64, odd strides) runs the ATen op named beside each function, which is
// also what FLUXTRAIN_GEMM_TUNING=0 runs on CUDA (for A/B measurements).
//
// Settings: FLUXTRAIN_GEMM_TUNING = 1 (default: tune), heuristic (the cuBLASLt path with the
// heuristic's first choice, no timing), 0 (ATen). FLUXTRAIN_GEMM_TUNING_FILE = the tuning file
// (default $XDG_CACHE_HOME/fluxtrain/gemm_tuning.txt, else ~/.cache/fluxtrain/gemm_tuning.txt;
// empty: none). Its lines are "device|shape key|algorithm" (the algorithm as cuBLASLt's 8 opaque
// 64-bit words in hex); lines of other devices are kept when it is rewritten (atomically).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>

#include <ATen/core/Tensor.h>

namespace fluxtrain::kernels {

enum class GemmTuning { Off, Heuristic, Tune };

// FLUXTRAIN_GEMM_TUNING, read once; set_gemm_tuning overrides it (tests).
GemmTuning gemm_tuning();
void set_gemm_tuning(GemmTuning mode);

// a [M, K] @ b [K, N] (+ bias [N] on every row): at::mm(a, b), or at::addmm(bias, a, b).
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias = {});

// out = beta * out + alpha * (a @ b) in place, out [M, N] (a view is fine; with beta 0 its
// contents are not read): at::addmm_out(out, out, a, b, beta, alpha).
void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha);

// x [..., in] w^T [in, out] + b without autograd (callers' own nodes): the tuned product, or
// at::linear.
at::Tensor linear_values(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

// x [..., in] w^T [in, out] + b as at::linear computes it, for a frozen w (and b): the tuned
// product forward and dx = dy w backward (a custom node; no weight gradient). When w or b needs
// a gradient, or the tuned path does not apply, at::linear itself.
at::Tensor frozen_linear_tuned(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

// Whether gemm/gemm_into take the cuBLASLt path for these operands (out undefined: a new output).
bool gemm_tuned_applies(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out = {});

// How cuBLASLt (column-major) reads a row-major [R, C] operand: its memory as [C, R] with leading
// dimension stride(0) when its rows are contiguous (transposed false), or as [R, C] with
// stride(1) when its columns are (transposed true). False when neither stride is 1.
bool gemm_operand_layout(const at::Tensor& t, bool& transposed, int64_t& ld);

// The tuning file (read and written on the CPU; tested there).
using GemmAlgoWords = std::array<uint64_t, 8>;
std::string gemm_tuning_file();
// The choices recorded for device in path (none when it is missing or unreadable; malformed
// lines are skipped).
std::map<std::string, GemmAlgoWords> read_gemm_tuning(const std::string& path, const std::string& device);
// Rewrites path atomically with device's choices replaced by these and other devices' lines
// kept; false (and the file untouched) when it cannot be written.
bool write_gemm_tuning(const std::string& path, const std::string& device,
                       const std::map<std::string, GemmAlgoWords>& choices);

#ifdef FLUXTRAIN_WITH_CUDA
// The cuBLASLt product (callers check gemm_tuned_applies first): out = beta * out + alpha * a @ b
// (+ bias, with beta 0).
void gemm_cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha,
               const at::Tensor& bias);
// Shapes tuned in this process, and how many came from the tuning file (tests).
struct GemmTuningStats {
  int64_t tuned = 0, from_file = 0, heuristic = 0;
};
GemmTuningStats gemm_tuning_stats();
// Forgets this process's choices (tests: the next use reads the file again).
void reset_gemm_tuning();
#endif

}  // namespace fluxtrain::kernels
