#include "train/optimizer.h"

#include <cmath>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "core/error.h"

namespace fluxtrain {

AdamW::AdamW(std::vector<at::Tensor> params, AdamWConfig cfg) : params_(std::move(params)), cfg_(cfg) {
  for (const auto& p : params_) {
    m_.push_back(at::zeros_like(p, p.options().requires_grad(false)));
    v_.push_back(at::zeros_like(p, p.options().requires_grad(false)));
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard ng;
  ++steps_;
  const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(steps_));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(steps_));
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor p = params_[i];
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    p.mul_(1.0 - lr * cfg_.weight_decay);
    m_[i].mul_(cfg_.beta1).add_(g, 1.0 - cfg_.beta1);
    v_[i].mul_(cfg_.beta2).addcmul_(g, g, 1.0 - cfg_.beta2);
    const at::Tensor denom = (v_[i].sqrt() / std::sqrt(bc2)).add_(cfg_.eps);
    p.addcdiv_(m_[i], denom, -lr / bc1);
  }
}

TensorMap AdamW::state() const {
  TensorMap s;
  for (size_t i = 0; i < params_.size(); ++i) {
    s.emplace("exp_avg." + std::to_string(i), m_[i]);
    s.emplace("exp_avg_sq." + std::to_string(i), v_[i]);
  }
  return s;
}

void AdamW::load_state(const TensorMap& state, int64_t steps, const std::string& file) {
  at::NoGradGuard ng;
  if (state.size() != 2 * params_.size())
    throw Error(file + ": optimizer state has " + std::to_string(state.size() / 2) + " parameters, expected " +
                std::to_string(params_.size()));
  for (size_t i = 0; i < params_.size(); ++i) {
    for (int which = 0; which < 2; ++which) {
      const std::string key = (which ? "exp_avg_sq." : "exp_avg.") + std::to_string(i);
      auto it = state.find(key);
      if (it == state.end()) throw Error(file + ": optimizer state lacks " + key);
      at::Tensor& dst = which ? v_[i] : m_[i];
      if (it->second.sizes() != dst.sizes())
        throw Error(file + ": optimizer state " + key + " has the wrong shape");
      dst.copy_(it->second);
    }
  }
  steps_ = steps;
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
  if (!std::isfinite(norm) || max_norm <= 0) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    at::NoGradGuard ng;
    for (const auto& p : params)
      if (p.grad().defined()) p.grad().mul_(coef);
  }
  return norm;
}

}  // namespace fluxtrain
