#include "train/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace fluxtrain {

double LrSchedule::factor(int64_t k) const {
  const double w = static_cast<double>(std::max<int64_t>(1, warmup_steps));
  if (kind == "constant") return 1.0;
  if (k < warmup_steps) return static_cast<double>(k) / w;
  if (kind == "constant_with_warmup") return 1.0;
  const double span = static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
  // Clamped at the end: diffusers' cosine would rise again past total_steps (never reached).
  const double progress = std::min(1.0, static_cast<double>(k - warmup_steps) / span);
  if (kind == "linear") return std::max(0.0, static_cast<double>(total_steps - k) / span);
  if (kind == "cosine") return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
  throw Error("--lr_scheduler: unknown schedule '" + kind + "'");
}

}  // namespace fluxtrain
