// Learning-rate schedules in closed form, as diffusers' get_scheduler (LambdaLR) defines them.
// `step` is the number of optimizer updates already done: update k (0-based) uses lr(k), so with
// warm-up the very first update has lr 0, exactly as in diffusers/PyTorch.
//   constant:              1
//   constant_with_warmup:  k < W ? k / W : 1
//   linear:                k < W ? k / W : max(0, (T - k) / (T - W))
//   cosine:                k < W ? k / W : max(0, 0.5 * (1 + cos(pi * (k - W) / (T - W))))
// (W = max(1, warmup) in the divisions, T = total updates; cosine has diffusers' 0.5 cycles and
// stays at 0 after T instead of rising again.)
#pragma once
#include <cstdint>
#include <string>

namespace fluxtrain {

struct LrSchedule {
  std::string kind = "constant";
  double base_lr = 1e-4;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;

  double factor(int64_t step) const;
  double lr(int64_t step) const { return base_lr * factor(step); }
};

}  // namespace fluxtrain
