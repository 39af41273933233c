// Dispatch, the frozen linear's node and the tuning file of kernels/gemm_tuned.h (the cuBLASLt
// path itself is kernels/gemm_tuned.cu, built with CUDA only).
#include "kernels/gemm_tuned.h"

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

namespace fluxtrain::kernels {
namespace {

std::atomic<int> g_mode{-1};  // -1: not read yet

GemmTuning mode_from_env() {
  const char* e = std::getenv("FLUXTRAIN_GEMM_TUNING");
  const std::string v = e ? e : "";
  if (v == "0" || v == "off") return GemmTuning::Off;
  if (v == "heuristic") return GemmTuning::Heuristic;
  return GemmTuning::Tune;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// y = x w^T + b forward, dx = dy w backward; w and b are frozen (no gradient).
struct FrozenLinearFunction : public torch::autograd::Function<FrozenLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});
    const at::Tensor y = gemm(x2, w.t(), b);
    if (x.requires_grad()) ctx->save_for_backward({w});
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    auto sizes = x.sizes().vec();
    sizes.back() = w.size(0);
    return y.view(sizes);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(3);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return out;
    const at::Tensor w = ctx->get_saved_variables()[0];
    out[0] = gemm(grads[0].reshape({-1, w.size(0)}), w).view(ctx->saved_data["x_sizes"].toIntVector());
    return out;
  }
};

std::string hex_words(const GemmAlgoWords& w) {
  std::string s;
  char buf[20];
  for (size_t i = 0; i < w.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%s%016llx", i ? " " : "", static_cast<unsigned long long>(w[i]));
    s += buf;
  }
  return s;
}

// "device|key|words" -> its three fields; false for a malformed line.
bool parse_line(const std::string& line, std::string& device, std::string& key, GemmAlgoWords& words) {
  const size_t p1 = line.find('|'), p2 = p1 == std::string::npos ? p1 : line.find('|', p1 + 1);
  if (p2 == std::string::npos) return false;
  device = line.substr(0, p1);
  key = line.substr(p1 + 1, p2 - p1 - 1);
  std::istringstream in(line.substr(p2 + 1));
  for (auto& w : words) {
    std::string tok;
    if (!(in >> tok) || tok.size() > 16 || tok.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
      return false;
    w = std::strtoull(tok.c_str(), nullptr, 16);
  }
  std::string extra;
  return !device.empty() && !key.empty() && !(in >> extra);
}

}  // namespace

bool gemm_operand_layout(const at::Tensor& t, bool& transposed, int64_t& ld) {
  const int64_t R = t.size(0), C = t.size(1);
  if (t.stride(1) == 1 && (R == 1 || t.stride(0) >= C)) {
    transposed = false;
    ld = R == 1 ? C : t.stride(0);
    return true;
  }
  if (t.stride(0) == 1 && (C == 1 || t.stride(1) >= R)) {
    transposed = true;
    ld = C == 1 ? R : t.stride(1);
    return true;
  }
  return false;
}

GemmTuning gemm_tuning() {
  int m = g_mode.load();
  if (m < 0) {
    m = static_cast<int>(mode_from_env());
    g_mode.store(m);
  }
  return static_cast<GemmTuning>(m);
}

void set_gemm_tuning(GemmTuning mode) { g_mode.store(static_cast<int>(mode)); }

bool gemm_tuned_applies(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
#ifdef FLUXTRAIN_WITH_CUDA
  if (gemm_tuning() == GemmTuning::Off || !a.defined() || !b.defined() || !a.is_cuda()) return false;
  const auto dt = a.scalar_type();
  if ((dt != at::kBFloat16 && dt != at::kHalf) || b.scalar_type() != dt || b.device() != a.device()) return false;
  if (a.dim() != 2 || b.dim() != 2 || a.size(1) != b.size(0) || a.numel() == 0 || b.numel() == 0) return false;
  bool t;
  int64_t ld;
  if (!gemm_operand_layout(a, t, ld) || !gemm_operand_layout(b, t, ld)) return false;
  if (out.defined()) {
    if (out.scalar_type() != dt || out.device() != a.device() || out.dim() != 2 || out.size(0) != a.size(0) ||
        out.size(1) != b.size(1) || out.stride(1) != 1 || (out.size(0) > 1 && out.stride(0) < out.size(1)))
      return false;
  }
  return true;
#else
  (void)a, (void)b, (void)out;
  return false;
#endif
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
#ifdef FLUXTRAIN_WITH_CUDA
  const bool bias_ok = !bias.defined() || (bias.scalar_type() == a.scalar_type() && bias.device() == a.device() &&
                                           bias.dim() == 1 && bias.size(0) == b.size(1) && bias.is_contiguous());
  if (bias_ok && gemm_tuned_applies(a, b)) {
    at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
    gemm_cuda(out, a, b, 0.0, 1.0, bias);
    return out;
  }
#endif
  return bias.defined() ? at::addmm(bias, a, b) : at::mm(a, b);
}

void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
#ifdef FLUXTRAIN_WITH_CUDA
  if (gemm_tuned_applies(a, b, out)) {
    gemm_cuda(out, a, b, beta, alpha, at::Tensor());
    return;
  }
#endif
  if (beta == 0.0) {
    at::Tensor o = out;
    at::addmm_out(o, o, a, b, 0.0, alpha);  // beta 0: out's contents unread
  } else {
    out.addmm_(a, b, beta, alpha);
  }
}

at::Tensor frozen_linear_tuned(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const bool frozen = !w.requires_grad() && (!b.defined() || !b.requires_grad());
  if (frozen && x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1) && x.numel() > 0 &&
      gemm_tuned_applies(x.reshape({-1, x.size(-1)}), w.t()))
    return FrozenLinearFunction::apply(x, w, b);
  return at::linear(x, w, b);
}

at::Tensor linear_values(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1) && x.numel() > 0) {
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});
    if (gemm_tuned_applies(x2, w.t())) {
      auto sizes = x.sizes().vec();
      sizes.back() = w.size(0);
      return gemm(x2, w.t(), b).view(sizes);
    }
  }
  return at::linear(x, w, b);
}

std::string gemm_tuning_file() {
  if (const char* f = std::getenv("FLUXTRAIN_GEMM_TUNING_FILE")) return f;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/fluxtrain/gemm_tuning.txt";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/fluxtrain/gemm_tuning.txt";
  return "";
}

std::map<std::string, GemmAlgoWords> read_gemm_tuning(const std::string& path, const std::string& device) {
  std::map<std::string, GemmAlgoWords> out;
  if (path.empty()) return out;
  std::ifstream in(path);
  std::string line, dev, key;
  GemmAlgoWords w{};
  while (std::getline(in, line))
    if (parse_line(line, dev, key, w) && dev == device) out[key] = w;
  return out;
}

bool write_gemm_tuning(const std::string& path, const std::string& device,
                       const std::map<std::string, GemmAlgoWords>& choices) {
  if (path.empty()) return false;
  std::vector<std::string> kept;
  {
    std::ifstream in(path);
    std::string line, dev, key;
    GemmAlgoWords w{};
    while (std::getline(in, line))
      if (parse_line(line, dev, key, w) && dev != device) kept.push_back(line);
  }
  std::error_code ec;
  const std::filesystem::path p(path);
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) return false;
    for (const auto& l : kept) out << l << '\n';
    for (const auto& [key, w] : choices) out << device << '|' << key << '|' << hex_words(w) << '\n';
    out.flush();
    if (!out) {
      std::filesystem::remove(tmp, ec);
      return false;
    }
  }
  std::error_code renamed;
  std::filesystem::rename(tmp, path, renamed);
  if (renamed) std::filesystem::remove(tmp, ec);
  return !renamed;
}

}  // namespace fluxtrain::kernels
