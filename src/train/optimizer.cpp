#include "train/optimizer.h"

#include <cmath>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "core/error.h"

namespace fluxtrain {

void adamw_update(at::Tensor& p, const at::Tensor& g, at::Tensor& m, at::Tensor& v, double lr, double bc1, double bc2,
                  const AdamWConfig& cfg) {
  p.mul_(1.0 - lr * cfg.weight_decay);
  m.mul_(cfg.beta1).add_(g, 1.0 - cfg.beta1);
  v.mul_(cfg.beta2).addcmul_(g, g, 1.0 - cfg.beta2);
  const at::Tensor denom = (v.sqrt() / std::sqrt(bc2)).add_(cfg.eps);
  p.addcdiv_(m, denom, -lr / bc1);
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

double grad_global_norm(const std::vector<at::Tensor>& params) {
  at::NoGradGuard ng;
  // One host sync for all parameters (this runs every update, also on the GPU).
  std::vector<at::Tensor> norms;
  for (const auto& p : params)
    if (p.grad().defined()) norms.push_back(p.grad().to(at::kDouble).norm());
  if (norms.empty()) return 0.0;
  return at::stack(norms).pow(2).sum().sqrt().item<double>();
}

double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  const double norm = grad_global_norm(params);
  if (!std::isfinite(norm)) return norm;
  const double coef = clip_coefficient(norm, max_norm);
  if (coef < 1.0) {
    at::NoGradGuard ng;
    for (const auto& p : params)
      if (p.grad().defined()) p.grad().mul_(coef);
  }
  return norm;
}

void Optimizer::step_on_device(double, double) {
  throw Error("this optimizer has no graph-capturable step", ErrorKind::Internal);
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
  }

  double step(double lr, double max_grad_norm) override {
    const double norm = clip_grad_norm(all_params(groups_), max_grad_norm);
    if (!std::isfinite(norm)) return norm;
    at::NoGradGuard ng;
    ++steps_;
    const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(steps_));
    const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(steps_));
    size_t i = 0;
    for (auto& g : groups_)
      for (auto& p : g.params) {
        const at::Tensor grad = p.grad();
        if (grad.defined()) {
          at::Tensor pd = p.detach();
          adamw_update(pd, grad, m_[i], v_[i], lr * g.lr_scale, bc1, bc2, cfg_);
        }
        ++i;
      }
    return norm;
  }

  int64_t steps() const override { return steps_; }

  void step_on_device(double lr, double max_grad_norm) override {
    at::NoGradGuard ng;
    std::vector<at::Tensor> grads;
    for (const auto& g : groups_)
      for (const auto& p : g.params) grads.push_back(p.grad());
    for (const auto& g : grads)
      if (!g.defined()) throw Error("step_on_device needs a gradient for every parameter", ErrorKind::Internal);
    const at::Tensor norm = at::stack(at::_foreach_norm(grads, 2)).to(at::kFloat).norm();
    const at::Tensor found_inf = at::logical_not(at::isfinite(norm)).to(at::kFloat);
    if (max_grad_norm > 0) at::_foreach_mul_(grads, at::clamp_max(max_grad_norm / (norm + 1e-6), 1.0));
    if (device_steps_.empty())
      for (const auto& m : m_) device_steps_.push_back(at::zeros({}, m.options().dtype(at::kFloat)));
    at::_foreach_add_(device_steps_, 1.0);
    size_t i = 0;
    for (auto& g : groups_) {
      const size_t n = g.params.size();
      std::vector<at::Tensor> p(g.params.begin(), g.params.end()), gr(grads.begin() + i, grads.begin() + i + n),
          m(m_.begin() + i, m_.begin() + i + n), v(v_.begin() + i, v_.begin() + i + n),
          st(device_steps_.begin() + i, device_steps_.begin() + i + n);
      for (auto& t : p) t = t.detach();
      at::_fused_adamw_(p, gr, m, v, {}, st, lr * g.lr_scale, cfg_.beta1, cfg_.beta2, cfg_.weight_decay, cfg_.eps,
                        /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt, found_inf);
      i += n;
    }
    at::_foreach_sub_(device_steps_, std::vector<at::Tensor>(device_steps_.size(), found_inf));
  }

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
  std::vector<at::Tensor> device_steps_;  // step_on_device's counts
  int64_t steps_ = 0;
};

}  // namespace

std::unique_ptr<Optimizer> make_adamw(std::vector<ParamGroup> groups, const AdamWConfig& cfg) {
  return std::make_unique<ReplicatedAdamW>(std::move(groups), cfg);
}

}  // namespace fluxtrain
