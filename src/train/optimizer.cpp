#include "train/optimizer.h"

#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "core/error.h"

namespace fluxtrain {

void adamw_update(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g, const std::vector<at::Tensor>& m,
                  const std::vector<at::Tensor>& v, const at::Tensor& step, const at::Tensor& lr, const AdamWConfig& cfg,
                  const at::Tensor& found_inf) {
  if (p.empty()) return;
  const std::vector<at::Tensor> steps(p.size(), step);
  at::_fused_adamw_(p, g, m, v, {}, steps, lr, cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.eps,
                    /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt,
                    found_inf.defined() ? std::optional<at::Tensor>(found_inf) : std::nullopt);
}

void adamw_update(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g, const std::vector<at::Tensor>& m,
                  const std::vector<at::Tensor>& v, const at::Tensor& step, double lr, const AdamWConfig& cfg,
                  const at::Tensor& found_inf) {
  if (p.empty()) return;
  // One step count for every tensor: the same 0-dim tensor, repeated (the kernel only reads it).
  const std::vector<at::Tensor> steps(p.size(), step);
  at::_fused_adamw_(p, g, m, v, {}, steps, lr, cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.eps,
                    /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt,
                    found_inf.defined() ? std::optional<at::Tensor>(found_inf) : std::nullopt);
}

double clip_coefficient(double norm, double max_norm) {
  if (max_norm <= 0) return 1.0;
  const double coef = max_norm / (norm + 1e-6);
  return coef < 1.0 ? coef : 1.0;
}

std::vector<at::Tensor> all_params(const std::vector<ParamGroup>& groups) {
  std::vector<at::Tensor> out;
  for (const auto& g : groups) out.insert(out.end(), g.params.begin(), g.params.end());
  return out;
}

namespace {

// The defined gradients of params grouped by (device, dtype), in order within each group: the
// multi-tensor (_foreach) kernels take one group at a time.
std::vector<std::vector<at::Tensor>> grads_by_device_and_dtype(const std::vector<at::Tensor>& params) {
  std::vector<std::vector<at::Tensor>> groups;
  for (const auto& p : params) {
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    auto it = std::find_if(groups.begin(), groups.end(), [&](const std::vector<at::Tensor>& grp) {
      return grp[0].device() == g.device() && grp[0].scalar_type() == g.scalar_type();
    });
    if (it == groups.end()) groups.push_back({g});
    else it->push_back(g);
  }
  return groups;
}

}  // namespace

double grad_sq_norm(const std::vector<at::Tensor>& params) {
  at::NoGradGuard ng;
  // Each parameter's norm in its gradient's dtype by one multi-tensor kernel per group, as
  // PyTorch's clip_grad_norm_ takes them (and as the device update does), then the squares summed
  // in float64 with one host sync for all parameters. Per-parameter casts and norms were two
  // kernels per parameter (760 for a rank-128 EasyControl LoRA) on every host update.
  at::Tensor total;
  for (const auto& grads : grads_by_device_and_dtype(params)) {
    at::Tensor sq = at::stack(at::_foreach_norm(grads, 2)).to(at::kDouble).pow(2).sum();
    total = total.defined() ? total + sq.to(total.device()) : sq;
  }
  return total.defined() ? total.item<double>() : 0.0;
}

double grad_global_norm(const std::vector<at::Tensor>& params) { return std::sqrt(grad_sq_norm(params)); }

double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, double extra_sq_norm) {
  const double norm = std::sqrt(grad_sq_norm(params) + extra_sq_norm);
  if (!std::isfinite(norm)) return norm;
  const double coef = clip_coefficient(norm, max_norm);
  if (coef < 1.0) {
    at::NoGradGuard ng;
    for (auto& grads : grads_by_device_and_dtype(params)) at::_foreach_mul_(grads, coef);
  }
  return norm;
}

Optimizer::DeviceStep Optimizer::step_on_device(const at::Tensor&, double, const at::Tensor&) {
  throw Error("this optimizer has no device-side step", ErrorKind::Internal);
}

void Optimizer::count_device_step(bool) {
  throw Error("this optimizer has no device-side step", ErrorKind::Internal);
}

namespace {

// Replicated AdamW: every rank holds the whole state and sees the same (averaged) gradients.
class ReplicatedAdamW final : public Optimizer {
 public:
  ReplicatedAdamW(std::vector<ParamGroup> groups, const AdamWConfig& cfg) : groups_(std::move(groups)), cfg_(cfg) {
    for (const auto& g : groups_)
      for (const auto& p : g.params) {
        m_.push_back(at::zeros_like(p, p.options().requires_grad(false)));
        v_.push_back(at::zeros_like(p, p.options().requires_grad(false)));
      }
    if (!m_.empty()) step_t_ = at::zeros({}, m_[0].options().dtype(at::kFloat));
  }

  double step(double lr, double max_grad_norm, double extra_sq_norm = 0) override {
    const double norm = clip_grad_norm(all_params(groups_), max_grad_norm, extra_sq_norm);
    if (!std::isfinite(norm)) return norm;
    at::NoGradGuard ng;
    ++steps_;
    step_t_.fill_(static_cast<double>(steps_));
    size_t i = 0;
    for (auto& g : groups_) {
      std::vector<at::Tensor> p, gr, m, v;  // parameters with a gradient; the others are left alone
      for (auto& t : g.params) {
        if (t.grad().defined()) {
          p.push_back(t.detach());
          gr.push_back(t.grad());
          m.push_back(m_[i]);
          v.push_back(v_[i]);
        }
        ++i;
      }
      adamw_update(p, gr, m, v, step_t_, lr * g.lr_scale, cfg_);
    }
    return norm;
  }

  int64_t steps() const override { return steps_; }

  bool has_device_step() const override { return true; }

  DeviceStep step_on_device(const at::Tensor& lr, double max_grad_norm, const at::Tensor& skip) override {
    at::NoGradGuard ng;
    std::vector<at::Tensor> grads;
    for (const auto& g : groups_)
      for (const auto& p : g.params) grads.push_back(p.grad());
    for (const auto& g : grads)
      if (!g.defined()) throw Error("step_on_device needs a gradient for every parameter", ErrorKind::Internal);
    DeviceStep out;
    out.norm = at::stack(at::_foreach_norm(grads, 2)).norm();
    const at::Tensor found_inf = at::logical_or(skip != 0, at::logical_not(at::isfinite(out.norm))).to(at::kFloat);
    if (max_grad_norm > 0) at::_foreach_mul_(grads, at::clamp_max(max_grad_norm / (out.norm + 1e-6), 1.0));
    // The step count advances on the device, unless the update is skipped.
    step_t_.add_(1.0 - found_inf);
    size_t i = 0;
    for (auto& g : groups_) {
      const size_t n = g.params.size();
      std::vector<at::Tensor> p(g.params.begin(), g.params.end()), gr(grads.begin() + i, grads.begin() + i + n),
          m(m_.begin() + i, m_.begin() + i + n), v(v_.begin() + i, v_.begin() + i + n);
      for (auto& t : p) t = t.detach();
      adamw_update(p, gr, m, v, step_t_, g.lr_scale == 1.0 ? lr : lr * g.lr_scale, cfg_, found_inf);
      i += n;
    }
    out.applied = 1.0 - found_inf;
    return out;
  }

  void count_device_step(bool applied) override { steps_ += applied ? 1 : 0; }

  TensorMap state() override {
    TensorMap s;
    for (size_t i = 0; i < m_.size(); ++i) {
      s.emplace("exp_avg." + std::to_string(i), m_[i]);
      s.emplace("exp_avg_sq." + std::to_string(i), v_[i]);
    }
    return s;
  }

  void load_state(const TensorMap& state, int64_t steps, const std::string& file) override {
    at::NoGradGuard ng;
    if (state.size() != 2 * m_.size())
      throw Error(file + ": optimizer state has " + std::to_string(state.size() / 2) + " parameters, expected " +
                  std::to_string(m_.size()));
    for (size_t i = 0; i < m_.size(); ++i) {
      for (int which = 0; which < 2; ++which) {
        const std::string key = (which ? "exp_avg_sq." : "exp_avg.") + std::to_string(i);
        auto it = state.find(key);
        if (it == state.end()) throw Error(file + ": optimizer state lacks " + key);
        at::Tensor& dst = which ? v_[i] : m_[i];
        if (it->second.sizes() != dst.sizes()) throw Error(file + ": optimizer state " + key + " has the wrong shape");
        dst.copy_(it->second);
      }
    }
    steps_ = steps;
    if (step_t_.defined()) step_t_.fill_(static_cast<double>(steps_));  // step_on_device counts from here
  }

  int64_t state_bytes() const override {
    int64_t b = 0;
    for (size_t i = 0; i < m_.size(); ++i) b += m_[i].nbytes() + v_[i].nbytes();
    return b;
  }

 private:
  std::vector<ParamGroup> groups_;
  AdamWConfig cfg_;
  std::vector<at::Tensor> m_, v_;
  at::Tensor step_t_;  // t on the device, read by the fused update
  int64_t steps_ = 0;
};

}  // namespace

std::unique_ptr<Optimizer> make_adamw(std::vector<ParamGroup> groups, const AdamWConfig& cfg) {
  return std::make_unique<ReplicatedAdamW>(std::move(groups), cfg);
}

}  // namespace fluxtrain
