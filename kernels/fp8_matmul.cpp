// Scaled fp8 GEMMs for frozen linears in their stored form (kernels/fp8_matmul.h): the rowwise
// activation quantiser, the float32 reference product, the path choice and the autograd node.
// ATen ops here (the quantiser's reference form is an inf-norm per row, a reciprocal and a
// multiply written straight into e4m3), so this file builds and runs on the CPU too; CUDA tensors take the
// one-pass kernels of kernels/fp8_operands.cu.
#include "kernels/fp8_matmul.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cfloat>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#ifdef FLUXTRAIN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

#include "core/error.h"
#include "kernels/fp8.h"

namespace fluxtrain::kernels {
namespace {

// FLUXTRAIN_FP8_OPERANDS=0: ATen's quantiser and transpose, and the paths chosen for them
// (the header says why); read once.
bool operand_kernels() {
#ifdef FLUXTRAIN_WITH_CUDA
  static const bool on = [] {
    const char* e = std::getenv("FLUXTRAIN_FP8_OPERANDS");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
#else
  return false;
#endif
}

// The forward products accumulate in the tensor cores' fast mode, as torchao's float8 training
// does for outputs (not for gradients): 2-3% faster steps, no measurable change of the output's
// error against bf16 (header). FLUXTRAIN_FP8_FAST_ACCUM=0 turns it off; read once.
bool fast_accum_forward() {
  static const bool on = [] {
    const char* e = std::getenv("FLUXTRAIN_FP8_FAST_ACCUM");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

// FLUXTRAIN_FP8_MATMUL=all: _scaled_mm wherever the shapes qualify, also with ATen's operands.
bool scaled_mm_everywhere() {
  static const bool all = [] {
    const char* e = std::getenv("FLUXTRAIN_FP8_MATMUL");
    return e && std::strcmp(e, "all") == 0;
  }();
  return all || operand_kernels();
}

bool fp8_gemm_device(const at::Tensor& t) {
#ifdef FLUXTRAIN_WITH_CUDA
  if (!t.is_cuda()) return false;
  const auto* p = at::cuda::getDeviceProperties(t.device().index());
  return p->major > 8 || (p->major == 8 && p->minor >= 9);  // fp8 tensor cores: Ada, Hopper and later
#else
  (void)t;
  return false;
#endif
}

// What at::_scaled_mm (rowwise scales) takes for a [m, k] x [k, n] product: k and n multiples of
// 16, an output dtype of bf16, f16 or f32. At least 16 rows: below that (the modulation linears,
// M = batch) the product is a weight-bound GEMV, where quantising buys nothing.
bool scaled_mm_shapes(int64_t m, int64_t k, int64_t n, at::ScalarType out) {
  return m >= 16 && k % 16 == 0 && n % 16 == 0 && k > 0 && n > 0 &&
         (out == at::kBFloat16 || out == at::kHalf || out == at::kFloat);
}

void check_weight(const at::Tensor& w8, const at::Tensor& w_scale) {
  if (w8.scalar_type() != at::kFloat8_e4m3fn || w8.dim() != 2 || !w_scale.defined() ||
      w_scale.scalar_type() != at::kFloat || (w_scale.numel() != 1 && w_scale.numel() != w8.size(0)))
    throw Error("fp8 matmul: expected e4m3 weight codes [out, in] with float32 scales ([out] or [1])",
                ErrorKind::Internal);
}

// w_scale as the [1, n] row _scaled_mm takes for mat2 (a per-tensor scale expanded).
at::Tensor scale_row(const at::Tensor& w_scale, int64_t n) {
  return w_scale.numel() == 1 ? w_scale.reshape({1, 1}).expand({1, n}).contiguous() : w_scale.reshape({1, n});
}

// Whether the current stream is being captured into a CUDA graph (its kernels only run on replay).
bool capturing() {
#ifdef FLUXTRAIN_WITH_CUDA
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
#else
  return false;
#endif
}

// A [1, k] row of float32 ones on the device: the scales of dx's columns. Kept per (device, k)
// so that the step does not fill one per product; not kept when made inside a CUDA-graph capture
// (its fill would only run on replay).
at::Tensor unit_scales(int64_t k, const at::Device& device) {
  const auto make = [&] { return at::ones({1, k}, at::TensorOptions().device(device).dtype(at::kFloat)); };
  if (capturing()) return make();
  static std::mutex mu;
  static std::map<std::pair<int, int64_t>, at::Tensor> kept;
  const std::lock_guard<std::mutex> lock(mu);
  at::Tensor& t = kept[{device.index(), k}];
  if (!t.defined()) t = make();
  return t;
}

// The forward's path for an [m, k] x [k, n] product whose activation is x (or begins with x).
Fp8Path forward_path(const at::Tensor& x, int64_t m, int64_t k, int64_t n) {
  if (!x.is_cuda()) return Fp8Path::Reference;
  if (!fp8_gemm_device(x) || !scaled_mm_shapes(m, k, n, x.scalar_type())) return Fp8Path::Dequantise;
  return scaled_mm_everywhere() || n >= 2 * k ? Fp8Path::ScaledMm : Fp8Path::Dequantise;
}

// cat(xs, 1) as one matrix, the last block as its tanh-GELU when gelu_last (the ATen form of
// what the CUDA quantiser does on the fly).
at::Tensor joined(const std::vector<at::Tensor>& xs, bool gelu_last) {
  std::vector<at::Tensor> blocks(xs);
  if (gelu_last) blocks.back() = at::gelu(blocks.back(), "tanh");
  return blocks.size() == 1 ? blocks[0] : at::cat(blocks, 1);
}

at::Tensor add_bias(at::Tensor y, const at::Tensor& bias) {
  return bias.defined() ? y.add_(bias.to(y.scalar_type())) : y;
}

// Whether _scaled_mm adds the bias in its epilogue: a bf16 (f16) bias with an output of the same
// dtype. Worth it: a separate add over a 4096 x 9216 bf16 output took 0.10 ms on the H200, more
// than half of the GEMM (0.18 ms), while the epilogue costs 0.005 ms.
bool epilogue_bias(const at::Tensor& bias, at::ScalarType out) {
  return bias.defined() && bias.scalar_type() == out && (out == at::kBFloat16 || out == at::kHalf) && bias.dim() == 1;
}

}  // namespace

namespace {
std::atomic<bool>& fast_gelu_flag() {
  static std::atomic<bool> flag([] {
    const char* e = std::getenv("FLUXTRAIN_FP8_FAST_GELU");
    return e != nullptr && std::strcmp(e, "1") == 0;
  }());
  return flag;
}
}  // namespace

void fp8_set_fast_gelu(bool fast) { fast_gelu_flag().store(fast); }
bool fp8_fast_gelu() { return fast_gelu_flag().load(); }

Fp8Rows fp8_quantise_rows(const at::Tensor& x, const at::Tensor& col_scale) {
  if (x.dim() != 2 || !at::isFloatingType(x.scalar_type()))
    throw Error("fp8 quantise rows: expected a 2-D floating tensor", ErrorKind::Internal);
#ifdef FLUXTRAIN_WITH_CUDA
  const auto t = x.scalar_type();
  if (x.is_cuda() && operand_kernels() && (t == at::kBFloat16 || t == at::kHalf || t == at::kFloat) &&
      x.stride(1) == 1 && x.stride(0) >= x.size(1))
    return fp8_quantise_rows_cuda(x, col_scale.defined() ? col_scale.to(at::kFloat).contiguous() : col_scale);
#endif
  at::Tensor xs = x;
  if (col_scale.defined()) {
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    xs = x.to(acc) * col_scale.reshape({1, -1}).to(acc);
  }
  // The largest magnitude of a row is one of its values, so the norm in x's dtype is exact.
  at::Tensor amax = at::linalg_vector_norm(xs, INFINITY, at::IntArrayRef{1}, /*keepdim=*/true).to(at::kFloat);
  at::Tensor scale = (amax / static_cast<float>(kE4m3Max)).clamp_min(FLT_MIN);
  at::Tensor codes = at::empty(xs.sizes(), xs.options().dtype(at::kFloat8_e4m3fn));
  // x times the reciprocal of its row's scale, computed in float32 (float64) and rounded once
  // into e4m3 (a multiply, as the CUDA kernel does: kernels/fp8_operands.cu says why).
  at::mul_out(codes, xs, at::reciprocal(scale));
  return {codes, scale};
}

Fp8Rows fp8_quantise_row_blocks(const std::vector<at::Tensor>& xs, bool gelu_last) {
#ifdef FLUXTRAIN_WITH_CUDA
  const auto in_place = [&](const at::Tensor& x) {
    const auto t = x.scalar_type();
    return x.is_cuda() && x.dim() == 2 && x.stride(1) == 1 && x.stride(0) >= x.size(1) &&
           x.scalar_type() == xs[0].scalar_type() && x.size(0) == xs[0].size(0) &&
           (t == at::kBFloat16 || t == at::kHalf || t == at::kFloat);
  };
  if (xs.size() <= 2 && operand_kernels() && std::all_of(xs.begin(), xs.end(), in_place))
    return fp8_quantise_rows_cuda(xs[0], at::Tensor(), xs.size() == 2 ? xs[1] : at::Tensor(), gelu_last);
#endif
  return fp8_quantise_rows(joined(xs, gelu_last));
}

Fp8Rows fp8_quantise_gelu_grad_rows(const at::Tensor& dact, const at::Tensor& pre, const at::Tensor& col_scale) {
  TORCH_CHECK(dact.dim() == 2 && pre.sizes() == dact.sizes() && pre.scalar_type() == dact.scalar_type(),
              "fp8_quantise_gelu_grad_rows: GELU's input must match its output's gradient");
#ifdef FLUXTRAIN_WITH_CUDA
  const auto t = dact.scalar_type();
  const auto unit_cols = [](const at::Tensor& x) { return x.is_cuda() && x.stride(1) == 1 && x.stride(0) >= x.size(1); };
  if (operand_kernels() && (t == at::kBFloat16 || t == at::kHalf || t == at::kFloat) && unit_cols(dact) &&
      unit_cols(pre))
    return fp8_quantise_rows_cuda(dact, col_scale.defined() ? col_scale.to(at::kFloat).contiguous() : col_scale,
                                  at::Tensor(), false, pre);
#endif
  return fp8_quantise_rows(at::gelu_backward(dact, pre, "tanh"), col_scale);
}

at::Tensor fp8_transpose_codes(const at::Tensor& w8) {
#ifdef FLUXTRAIN_WITH_CUDA
  if (w8.is_cuda() && operand_kernels() && w8.dim() == 2) return fp8_transpose_codes_cuda(w8);
#endif
  return w8.t().contiguous();
}

at::Tensor fp8_scaled_mm_reference(const at::Tensor& a8, const at::Tensor& s_a, const at::Tensor& b8,
                                   const at::Tensor& s_b, at::ScalarType out_dtype) {
  const auto acc = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor a = a8.to(acc) * s_a.reshape({-1, 1}).to(acc);
  const at::Tensor b = b8.to(acc) * s_b.reshape({-1, 1}).to(acc);
  return at::mm(a, b.t()).to(out_dtype);
}

Fp8Path fp8_forward_path(const at::Tensor& x2, const at::Tensor& w8) {
  return forward_path(x2, x2.size(0), x2.size(1), w8.size(0));
}

Fp8Path fp8_input_grad_path(const at::Tensor& dy2, const at::Tensor& w8) {
  if (!dy2.is_cuda()) return Fp8Path::Reference;
  const int64_t m = dy2.size(0), n = dy2.size(1), k = w8.size(1);
  if (!fp8_gemm_device(dy2) || !scaled_mm_shapes(m, n, k, dy2.scalar_type())) return Fp8Path::Dequantise;
  return scaled_mm_everywhere() ? Fp8Path::ScaledMm : Fp8Path::Dequantise;
}

at::Tensor fp8_linear_forward_blocks(const std::vector<at::Tensor>& xs2, const at::Tensor& w8,
                                     const at::Tensor& w_scale, const at::Tensor& bias, Fp8Path path, bool gelu_last) {
  check_weight(w8, w_scale);
  const at::Tensor& x0 = xs2.at(0);
  if (path == Fp8Path::Auto) {
    int64_t k = 0;
    for (const auto& x : xs2) k += x.size(1);
    path = forward_path(x0, x0.size(0), k, w8.size(0));
  }
  const auto dt = x0.scalar_type();
  if (path == Fp8Path::Dequantise)
    return add_bias(at::mm(joined(xs2, gelu_last), fp8_dequantise(w8.contiguous(), w_scale, dt).t()), bias);
  const Fp8Rows q = fp8_quantise_row_blocks(xs2, gelu_last);
  if (path == Fp8Path::Reference) return add_bias(fp8_scaled_mm_reference(q.data, q.scale, w8, w_scale, dt), bias);
  // mat2 = w8^T [K, N] column-major: the row-major codes transposed, no copy (a narrowed view's
  // rows are copied first, so the leading dimension is K).
  const at::Tensor w = w8.stride(1) == 1 && w8.stride(0) == w8.size(1) ? w8 : w8.contiguous();
  const bool in_epilogue = epilogue_bias(bias, dt);
  at::Tensor y = at::_scaled_mm(q.data, w.t(), q.scale, scale_row(w_scale, w.size(0)),
                                in_epilogue ? std::optional<at::Tensor>(bias.contiguous()) : std::nullopt, std::nullopt, dt,
                                fast_accum_forward());
  return in_epilogue ? y : add_bias(y, bias);
}

at::Tensor fp8_linear_forward(const at::Tensor& x2, const at::Tensor& w8, const at::Tensor& w_scale,
                              const at::Tensor& bias, Fp8Path path) {
  return fp8_linear_forward_blocks({x2}, w8, w_scale, bias, path);
}

namespace {

// fp8_linear_input_grad_blocks with dy2 = gelu_backward(dy2, gelu_in, "tanh") when gelu_in is
// defined (taken by the quantiser on the fp8 paths, computed first on the dequantising one).
std::vector<at::Tensor> input_grad_blocks(const at::Tensor& dy2, const at::Tensor& gelu_in, const at::Tensor& w8,
                                          const at::Tensor& w_scale, const std::vector<int64_t>& widths, Fp8Path path) {
  check_weight(w8, w_scale);
  const int64_t k = w8.size(1);
  int64_t total = 0;
  bool aligned = true;
  for (int64_t wd : widths) {
    total += wd;
    aligned = aligned && wd % 16 == 0;
  }
  TORCH_CHECK(total == k, "fp8_linear_input_grad_blocks: the widths do not add up to the weight's columns");
  if (path == Fp8Path::Auto) path = fp8_input_grad_path(dy2, w8);
  const auto dt = dy2.scalar_type();
  const auto blocks_of = [&](const at::Tensor& dx) {
    std::vector<at::Tensor> out;
    int64_t c = 0;
    for (int64_t wd : widths) {
      out.push_back(dx.narrow(1, c, wd));
      c += wd;
    }
    return out;
  };
  if (path == Fp8Path::Dequantise)
    return blocks_of(at::mm(gelu_in.defined() ? at::gelu_backward(dy2, gelu_in, "tanh") : dy2,
                            fp8_dequantise(w8.contiguous(), w_scale, dt)));
  // The weight's scales sit on the contraction dimension: folded into dy, so that w8 enters as
  // its bare codes (scale 1 per output column of dx).
  const Fp8Rows q = gelu_in.defined() ? fp8_quantise_gelu_grad_rows(dy2, gelu_in, w_scale) : fp8_quantise_rows(dy2, w_scale);
  // w8 as [N, K] column-major: the transposed codes, kept or made per call (header).
  const at::Tensor wt = fp8_transposed_for_input_grad(w8);  // [K, N] row-major
  if (path == Fp8Path::Reference)
    return blocks_of(
        fp8_scaled_mm_reference(q.data, q.scale, wt, at::ones({k, 1}, dy2.options().dtype(at::kFloat)), dt));
  if (widths.size() == 1 || !aligned)
    return blocks_of(
        at::_scaled_mm(q.data, wt.t(), q.scale, unit_scales(k, dy2.device()), std::nullopt, std::nullopt, dt));
  // One product per block: rows c .. c + width of the transposed codes are a packed [N, width]
  // column-major operand, and each block's gradient comes out contiguous.
  std::vector<at::Tensor> out;
  int64_t c = 0;
  for (int64_t wd : widths) {
    out.push_back(at::_scaled_mm(q.data, wt.narrow(0, c, wd).t(), q.scale, unit_scales(wd, dy2.device()),
                                 std::nullopt, std::nullopt, dt));
    c += wd;
  }
  return out;
}

}  // namespace

std::vector<at::Tensor> fp8_linear_input_grad_blocks(const at::Tensor& dy2, const at::Tensor& w8,
                                                     const at::Tensor& w_scale, const std::vector<int64_t>& widths,
                                                     Fp8Path path) {
  return input_grad_blocks(dy2, at::Tensor(), w8, w_scale, widths, path);
}

at::Tensor fp8_linear_input_grad_through_gelu(const at::Tensor& dact2, const at::Tensor& pre2, const at::Tensor& w8,
                                              const at::Tensor& w_scale, Fp8Path path) {
  TORCH_CHECK(pre2.sizes() == dact2.sizes(), "fp8_linear_input_grad_through_gelu: GELU's input and its gradient differ in shape");
  return input_grad_blocks(dact2, pre2, w8, w_scale, {w8.size(1)}, path)[0];
}

namespace {

// The weights registered by fp8_keep_transposed, by storage, each with the transposed codes of
// the views used so far (keyed by offset, sizes and strides).
struct KeptTransposes {
  struct Weight {
    c10::weak_intrusive_ptr<c10::StorageImpl> alive;
    std::map<std::array<int64_t, 5>, at::Tensor> views;
  };
  std::mutex mu;
  std::map<const c10::StorageImpl*, Weight> weights;
};

KeptTransposes& kept_transposes() {
  static KeptTransposes k;
  return k;
}

}  // namespace

void fp8_keep_transposed(const at::Tensor& w8) {
  if (!w8.defined() || !w8.has_storage() || w8.scalar_type() != at::kFloat8_e4m3fn) return;
  auto& k = kept_transposes();
  const std::lock_guard<std::mutex> lock(k.mu);
  const c10::StorageImpl* impl = w8.storage().unsafeGetStorageImpl();
  const auto it = k.weights.find(impl);
  if (it != k.weights.end() && !it->second.alive.expired()) return;  // registered already
  if (it != k.weights.end()) k.weights.erase(it);  // a freed weight's storage address, reused
  k.weights.emplace(impl, KeptTransposes::Weight{w8.storage().getWeakStorageImpl(), {}});
}

void fp8_forget_transposed(const at::Tensor& w8) {
  if (!w8.defined() || !w8.has_storage()) return;
  auto& k = kept_transposes();
  const std::lock_guard<std::mutex> lock(k.mu);
  k.weights.erase(w8.storage().unsafeGetStorageImpl());
}

void fp8_drop_kept_transposed() {
  auto& k = kept_transposes();
  const std::lock_guard<std::mutex> lock(k.mu);
  k.weights.clear();
}

int64_t fp8_kept_transposed_bytes() {
  auto& k = kept_transposes();
  const std::lock_guard<std::mutex> lock(k.mu);
  int64_t bytes = 0;
  for (const auto& [impl, w] : k.weights)
    if (!w.alive.expired())
      for (const auto& [key, t] : w.views) bytes += t.nbytes();
  return bytes;
}

at::Tensor fp8_transposed_for_input_grad(const at::Tensor& w8) {
  auto& k = kept_transposes();
  const std::lock_guard<std::mutex> lock(k.mu);
  if (k.weights.empty() || !w8.has_storage()) return fp8_transpose_codes(w8);
  const auto it = k.weights.find(w8.storage().unsafeGetStorageImpl());
  if (it == k.weights.end()) return fp8_transpose_codes(w8);
  if (it->second.alive.expired()) {  // the registered weight was freed; this storage is another
    k.weights.erase(it);
    return fp8_transpose_codes(w8);
  }
  const std::array<int64_t, 5> view{w8.storage_offset(), w8.size(0), w8.size(1), w8.stride(0), w8.stride(1)};
  const auto v = it->second.views.find(view);
  if (v != it->second.views.end()) return v->second;
  at::Tensor wt = fp8_transpose_codes(w8);
  // Inside a capture the transpose only runs on replay: made per call there, kept when eager.
  if (!capturing()) it->second.views.emplace(view, wt);
  return wt;
}

at::Tensor fp8_linear_input_grad(const at::Tensor& dy2, const at::Tensor& w8, const at::Tensor& w_scale,
                                 Fp8Path path) {
  return fp8_linear_input_grad_blocks(dy2, w8, w_scale, {w8.size(1)}, path)[0];
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Fp8LinearFunction : public torch::autograd::Function<Fp8LinearFunction> {
  // bias optional: autograd's custom functions take no undefined tensor arguments.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w8, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias) {
    const int64_t k = x.size(-1), n = w8.size(0);
    at::Tensor y = fp8_linear_forward(x.reshape({-1, k}), w8, w_scale, bias.value_or(at::Tensor()));
    // Only the codes and scales are kept for backward (a streamed block's weights must not
    // outlive their use when x needs no gradient).
    const bool x_grad = x.requires_grad();
    ctx->save_for_backward({x_grad ? w8 : at::Tensor(), x_grad ? w_scale : at::Tensor()});
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();  // needs_input_grad counts tensors given
    auto sizes = x.sizes().vec();
    sizes.back() = n;
    return y.view(sizes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    variable_list result(4);
    if (!grads[0].defined()) return result;
    const at::Tensor dy = grads[0].reshape({-1, grads[0].size(-1)});
    if (ctx->needs_input_grad(0))
      result[0] = fp8_linear_input_grad(dy, saved[0], saved[1]).view(ctx->saved_data["x_sizes"].toIntVector());
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) result[3] = dy.sum(0);
    return result;
  }
};

}  // namespace

at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& w_scale, const at::Tensor& bias) {
  return Fp8LinearFunction::apply(x, w8, w_scale, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
}

}  // namespace fluxtrain::kernels
