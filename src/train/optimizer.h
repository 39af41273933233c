// AdamW on float32 master weights (PyTorch's torch.optim.AdamW semantics, amsgrad off):
//   p <- p * (1 - lr * wd)
//   m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
//   p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// and gradient clipping by the global L2 norm (torch.nn.utils.clip_grad_norm_: scale by
// max_norm / (norm + 1e-6) when that is below 1).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"

namespace fluxtrain {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 1e-4;
};

class AdamW {
 public:
  AdamW() = default;
  AdamW(std::vector<at::Tensor> params, AdamWConfig cfg);
  // One update with learning rate lr from params[i].grad(); parameters without a gradient are
  // left alone (their moments too).
  void step(double lr);
  int64_t steps() const { return steps_; }
  const std::vector<at::Tensor>& params() const { return params_; }
  // "exp_avg.<i>", "exp_avg_sq.<i>" for parameter i, in parameter order.
  TensorMap state() const;
  void load_state(const TensorMap& state, int64_t steps, const std::string& file);

 private:
  std::vector<at::Tensor> params_, m_, v_;
  AdamWConfig cfg_;
  int64_t steps_ = 0;
};

// Global L2 norm of the gradients (float64 accumulation); NaN/inf if any gradient is non-finite.
double grad_global_norm(const std::vector<at::Tensor>& params);
// Scales gradients so that their global norm is at most max_norm; returns the norm before.
// A non-finite norm leaves the gradients untouched (the caller skips the update).
double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm);

}  // namespace fluxtrain
