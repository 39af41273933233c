// Frozen linears multiplied in fp8 (--fp8_matmul): the weight stays in its stored form (e4m3
// codes w8 [out, in] with float32 scales per output channel [out] or per tensor [1], kernels/fp8.h)
// and the activation is quantised per row to e4m3, so that the GEMM runs as a scaled fp8 GEMM
// (at::_scaled_mm: about 1440 TFLOP/s on an H200 against 790 in bf16) instead of dequantising the
// weight to bf16 first. Only the input gradient is computed: the weights are frozen.
//
//   forward   x [M, K] -> rows: s_x = max(amax|row| / 448, FLT_MIN), x8 = e4m3(x * (1 / s_x))
//             y = (x8 * s_x) (w8 * s_w)^T  (+ b)                    at::_scaled_mm(x8, w8^T)
//             (a bf16/f16 bias of the output's dtype is added in _scaled_mm's epilogue, in float32
//             before the rounding; otherwise, and on the other paths, after the product)
//   backward  dy [M, N]: the weight's per-channel scale lies on the contraction dimension of
//             dy w, so it is folded into dy first: g = dy * s_w[None, :] (float32), then rows:
//             s_g, g8 = e4m3(g * (1 / s_g)); dx = (g8 * s_g) w8           at::_scaled_mm(g8, w8)
//
// Paths (Fp8Path): ScaledMm (CUDA, sm >= 8.9, dims multiples of 16, at least 16 rows);
// Reference (any device; the CPU's path, so CPU runs exercise the quantisation): the same
// quantised operands multiplied in float32 (float64 for float64 activations) by
// fp8_scaled_mm_reference; Dequantise (CUDA shapes _scaled_mm does not take): w dequantised to
// the activation dtype and an ordinary GEMM, the numerics of --base_precision fp8 alone.
//
// Which CUDA GEMMs take the fp8 path by default (FLUXTRAIN_FP8_MATMUL=auto): all whose shapes
// _scaled_mm takes, forward and input gradient, since both operands are made by one-pass kernels
// (kernels/fp8_operands.cu): the rowwise quantiser (with the input gradient's column scales
// folded in) and the transposition of the codes that dx = dy w needs (_scaled_mm takes w8 only
// K-major; made per call unless kept, below: a block's weights may be transient, streamed or held
// one block at a time, and a kept copy costs the fp8 weights' bytes again).
// Before those kernels (session 11, H200, 4096 rows), ATen's quantiser cost about 5 bytes per
// element of x (3072->3072 0.15 ms vs 0.10 bf16; 12288->3072 0.60 vs 0.39) and its byte transpose
// 0.17 ms for 3072x9216, so only wide forward products (out >= 2 * in) gained and dx dequantised.
// FLUXTRAIN_FP8_OPERANDS=0 restores that: the ATen operands and that choice of paths (an A/B of
// the kernels). The forward products use _scaled_mm's fast accumulation (H200, graph step at
// 384/768/64 and 512/1024/128: 193.1 / 343.2 ms without, 187.0 / 335.6 with, session 14; FLUX.1-dev
// output against bf16 3.90% rms without, 3.89% with); input gradients accumulate exactly.
// FLUXTRAIN_FP8_FAST_ACCUM=0 turns it off. Session 15 (same GPU): 177.5 / 323.8 ms with the
// GELU applied by the quantiser, 170.6 / 317.8 with the transposed codes kept (below); bf16
// weights 217.5 / 394.1 (docs/benchmarks.md). Session 16: 168.1 / 315.2 ms with GELU's backward
// in the up projection's gradient quantiser too (fp8_linear_input_grad_through_gelu).
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>

namespace fluxtrain::kernels {

enum class Fp8Path { Auto, ScaledMm, Reference, Dequantise };

struct Fp8Rows {
  at::Tensor data;   // Float8_e4m3fn [M, K]
  at::Tensor scale;  // float32 [M, 1]
};

// Rowwise e4m3 quantisation of a 2-D floating x (times col_scale [K] or [1] along the columns
// first, in float32, when given): s = max(float32(amax |row|) / 448, FLT_MIN), r = float32(1 / s);
// codes = e4m3(x * r) with the product in float32 (float64 for float64 x), rounded to nearest
// even. |x * r| <= 448 + a few ulp by construction, so nothing saturates; the floor keeps
// all-zero rows finite.
// CUDA tensors go through the one-pass kernel (same bits as the formula), others through ATen ops.
Fp8Rows fp8_quantise_rows(const at::Tensor& x, const at::Tensor& col_scale = {});

// The rows of the concatenation cat(xs, 1) of 2-D blocks with the same rows, quantised as one
// matrix (CUDA: two blocks of one dtype are read in place, without the concatenation).
// gelu_last: the last block enters as at::gelu(block, "tanh") (FLUX's MLP activation, rounded to
// the block's dtype); on CUDA made while quantising (same bits), elsewhere by at::gelu first.
Fp8Rows fp8_quantise_row_blocks(const std::vector<at::Tensor>& xs, bool gelu_last = false);

// The rows of GELU's backward, at::gelu_backward(dact, pre, "tanh") (rounded to dact's dtype),
// times col_scale along the columns, quantised as fp8_quantise_rows does: the input gradient of
// an MLP's up projection from the gradient of GELU's output dact and its input pre (same shape
// and dtype). On CUDA one pass over dact and pre (same bits as the composition), elsewhere the
// composition.
Fp8Rows fp8_quantise_gelu_grad_rows(const at::Tensor& dact, const at::Tensor& pre, const at::Tensor& col_scale = {});

// How the CUDA quantisers evaluate GELU and its derivative (gelu_last, fp8_quantise_gelu_grad_rows).
// Exact (the default): ATen's formulas with tanhf, the same bits as at::gelu / at::gelu_backward.
// Fast: the same functions through the logistic function, 1 + tanh u = 2 / (1 + e^(-2u)), with
// __expf and a reciprocal (kernels/fp8_operands.cu): within a few float32 ulp, so the rounded
// values differ from ATen's by one ulp of the activation's dtype at most, before the e4m3
// rounding (2^-4) that follows. Session 16 found the quantisers with tanhf bound by arithmetic
// (the GELU-gradient quantiser gained 1 ms of the 6.6 that GELU's backward kernel took). Measured
// in session 17 they gain 1% at 512/1024/128 and nothing at 384/768/64, and 15% of the gradient's
// codes differ from the exact forms', so they are off unless FLUXTRAIN_FP8_FAST_GELU=1 (read
// once; the tests switch it with fp8_set_fast_gelu). CPU runs compose ATen's ops either way.
void fp8_set_fast_gelu(bool fast);
bool fp8_fast_gelu();

// The codes of w8 [N, K] transposed into a new contiguous [K, N] tensor.
at::Tensor fp8_transpose_codes(const at::Tensor& w8);

#ifdef FLUXTRAIN_WITH_CUDA
// The one-pass kernels (kernels/fp8_operands.cu). x: bf16, f16 or f32 with unit column stride;
// col_scale contiguous float32 [K] or [1] on x's device.
// x1, when given, is concatenated after x0 (same rows and dtype); col_scale spans both.
// gelu_last: the last block (x1, else x0) enters as its tanh-GELU rounded to its dtype.
// gelu_grad_of (x0 alone, same shape and dtype): x0 enters as at::gelu_backward(x0, gelu_grad_of,
// "tanh") rounded to its dtype.
Fp8Rows fp8_quantise_rows_cuda(const at::Tensor& x0, const at::Tensor& col_scale = {}, const at::Tensor& x1 = {},
                               bool gelu_last = false, const at::Tensor& gelu_grad_of = {});
at::Tensor fp8_transpose_codes_cuda(const at::Tensor& w8);
#endif

// (float32(a8) * s_a) @ (float32(b8) * s_b)^T in float32 (float64 when out_dtype is), rounded
// to out_dtype. a8 [M, K], s_a M or 1 values; b8 [N, K], s_b N or 1 values (any shape).
at::Tensor fp8_scaled_mm_reference(const at::Tensor& a8, const at::Tensor& s_a, const at::Tensor& b8,
                                   const at::Tensor& s_b, at::ScalarType out_dtype);

// The path Auto picks for x [M, K] times w8 [N, K]^T (forward) or dy [M, N] times w8 (dx).
Fp8Path fp8_forward_path(const at::Tensor& x2, const at::Tensor& w8);
Fp8Path fp8_input_grad_path(const at::Tensor& dy2, const at::Tensor& w8);

// No autograd (LoraLinearFunction's base GEMM and fp8_linear's node use them). x2 [M, K],
// dy2 [M, N], w8 [N, K] e4m3 (columns may be a narrowed view), w_scale float32 [N] or [1]; the
// results are new tensors in x2's (dy2's) dtype.
at::Tensor fp8_linear_forward(const at::Tensor& x2, const at::Tensor& w8, const at::Tensor& w_scale,
                              const at::Tensor& bias, Fp8Path path = Fp8Path::Auto);
// The forward of cat(xs2, 1) [M, K] times w8^T, the blocks quantised as one matrix (a single
// block's linear2 over [attention, GELU(mlp)], model/gelu_linear.cpp); gelu_last: the last block
// is the pre-activation, multiplied as its tanh-GELU (fp8_quantise_row_blocks).
at::Tensor fp8_linear_forward_blocks(const std::vector<at::Tensor>& xs2, const at::Tensor& w8,
                                     const at::Tensor& w_scale, const at::Tensor& bias, Fp8Path path = Fp8Path::Auto,
                                     bool gelu_last = false);
at::Tensor fp8_linear_input_grad(const at::Tensor& dy2, const at::Tensor& w8, const at::Tensor& w_scale,
                                 Fp8Path path = Fp8Path::Auto);

// The input gradient of a linear whose output enters GELU, from the gradient of GELU's output:
// dx = gelu_backward(dact2, pre2, "tanh") w, with GELU's backward applied by the quantiser of
// the gradient (fp8_quantise_gelu_grad_rows), so the pre-activation's gradient is never written.
// pre2: the linear's output [M, N] (GELU's input). Same numerics as at::gelu_backward followed
// by fp8_linear_input_grad.
at::Tensor fp8_linear_input_grad_through_gelu(const at::Tensor& dact2, const at::Tensor& pre2, const at::Tensor& w8,
                                              const at::Tensor& w_scale, Fp8Path path = Fp8Path::Auto);

// The input gradient of a product over concatenated inputs, per input: blocks of widths (adding
// up to K) of dy2 w. dy2 is quantised and the codes transposed once; on the _scaled_mm path each
// block is its own product and comes out contiguous (a single block's linear2: GELU's backward
// then reads a dense gradient), elsewhere the blocks are column views of one product.
std::vector<at::Tensor> fp8_linear_input_grad_blocks(const at::Tensor& dy2, const at::Tensor& w8,
                                                     const at::Tensor& w_scale, const std::vector<int64_t>& widths,
                                                     Fp8Path path = Fp8Path::Auto);

// Transposed codes kept (--fp8_keep_transposed): dx = dy w needs w8 K-major along its rows, so
// every input gradient transposes its weight's codes (7.8 ms per step at 512/1024/128 on the
// H200: 340 transposes of the 8 GiB of FLUX.1-dev codes). For weights registered here, the
// transpose of each view used is made at its first input gradient outside a CUDA-graph capture
// and kept, at the cost of those codes' bytes again. Only weights that never change may be
// registered (resident fp8 blocks: dist/fp8_weights.h); never a buffer that a provider refills
// with other blocks. Whoever registers a weight unregisters it (fp8_forget_transposed) when it
// goes; the registry also holds the storages weakly, so a freed weight's address never hands out
// its copies to another tensor. fp8_drop_kept_transposed() drops all.
void fp8_keep_transposed(const at::Tensor& w8);
void fp8_forget_transposed(const at::Tensor& w8);  // w8's storage unregistered, its copies freed
void fp8_drop_kept_transposed();
int64_t fp8_kept_transposed_bytes();
// The transposed codes [K, N] of w8 [N, K] for dx = dy w: the kept copy, or one made now.
at::Tensor fp8_transposed_for_input_grad(const at::Tensor& w8);

// y = x w^T + b with w = w8 * w_scale (rows), x [..., K]; differentiable in x (and b).
at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& w_scale, const at::Tensor& bias);

}  // namespace fluxtrain::kernels
