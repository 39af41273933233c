#include "model/position_ids.h"

#include <ATen/ATen.h>

namespace fluxtrain {
namespace {
at::Tensor grid_ids(int64_t h, int64_t w, double row_scale, double col_scale, double row_offset) {
  at::Tensor rows = at::arange(h, at::kDouble) * row_scale + row_offset;
  at::Tensor cols = at::arange(w, at::kDouble) * col_scale;
  at::Tensor ids = at::zeros({h, w, 3}, at::kDouble);
  ids.select(2, 1).copy_(rows.unsqueeze(1).expand({h, w}));
  ids.select(2, 2).copy_(cols.unsqueeze(0).expand({h, w}));
  return ids.reshape({h * w, 3});
}
}  // namespace

at::Tensor noise_position_ids(int64_t h, int64_t w) { return grid_ids(h, w, 1.0, 1.0, 0.0); }

at::Tensor subject_position_ids(int64_t cond_h, int64_t cond_w) { return grid_ids(cond_h, cond_w, 1.0, 1.0, 64.0); }

at::Tensor spatial_position_ids(int64_t cond_h, int64_t cond_w, int64_t noise_h, int64_t noise_w) {
  return grid_ids(cond_h, cond_w, static_cast<double>(noise_h) / cond_h, static_cast<double>(noise_w) / cond_w, 0.0);
}

at::Tensor text_position_ids(int64_t t) { return at::zeros({t, 3}, at::kDouble); }

}  // namespace fluxtrain
