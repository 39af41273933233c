#include "data/augment.h"

#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/rng.h"
#include "data/image_io.h"

namespace fluxtrain {

SampleDraws draw_sample(uint64_t seed, uint64_t epoch, uint64_t sample, double caption_dropout,
                        const std::vector<int64_t>& num_variants) {
  ScalarRng rng(derive_seed(seed, RngPurpose::Augment, epoch, sample));
  SampleDraws d;
  d.drop_caption = rng.uniform() < caption_dropout;
  for (int64_t v : num_variants) {
    const double u_variant = rng.uniform(), u_flip = rng.uniform(), u_angle = rng.uniform();
    d.variant.push_back(std::min<int64_t>(std::max<int64_t>(v, 1) - 1, static_cast<int64_t>(u_variant * v)));
    d.subject.push_back({u_flip < kSubjectFlipP, (2 * u_angle - 1) * kSubjectMaxAngle});
  }
  return d;
}

namespace {
// EasyControl's multiple_16: round to the nearest multiple of 16.
int64_t multiple_16(double x) { return std::max<int64_t>(16, static_cast<int64_t>(std::lround(x / 16.0)) * 16); }
}  // namespace

at::Tensor rotate_nearest(const at::Tensor& hwc_u8, double angle_deg) {
  if (angle_deg == 0) return hwc_u8;
  const int64_t H = hwc_u8.size(0), W = hwc_u8.size(1);
  const double a = angle_deg * M_PI / 180.0, c = std::cos(a), s = std::sin(a);
  // Output pixel centre (x, y) relative to the image centre maps back to the source point rotated
  // by -angle (y points down, so a counter-clockwise turn on screen is +angle here).
  const auto f = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor xs = at::arange(W, f).add(0.5).sub(W / 2.0).view({1, W}).expand({H, W});
  const at::Tensor ys = at::arange(H, f).add(0.5).sub(H / 2.0).view({H, 1}).expand({H, W});
  const at::Tensor sx = xs * c - ys * s + W / 2.0, sy = xs * s + ys * c + H / 2.0;
  const at::Tensor ix = at::floor(sx).to(at::kLong), iy = at::floor(sy).to(at::kLong);
  const at::Tensor inside = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H);
  const at::Tensor flat = (iy.clamp(0, H - 1) * W + ix.clamp(0, W - 1)).view({-1});
  at::Tensor out = hwc_u8.reshape({H * W, -1}).index_select(0, flat).view({H, W, -1}).clone();
  out.masked_fill_(inside.logical_not().unsqueeze(-1), 0);
  return out;
}

at::Tensor subject_resize(const at::Tensor& hwc_u8, int64_t cond_size) {
  const double w = static_cast<double>(hwc_u8.size(1)), h = static_cast<double>(hwc_u8.size(0));
  const double m = std::max(w, h);
  const int64_t nw = std::min(cond_size, multiple_16(cond_size * w / m));
  const int64_t nh = std::min(cond_size, multiple_16(cond_size * h / m));
  return resize_rgb8(hwc_u8, nw, nh, ResizeFilter::Bilinear);
}

at::Tensor subject_finish(const at::Tensor& resized, int64_t cond_size, const SubjectAugment* aug) {
  at::Tensor img = resized;
  if (aug && aug->flip) img = img.flip({1});
  if (aug) img = rotate_nearest(img, aug->angle_deg);
  const int64_t h = img.size(0), w = img.size(1);
  check_input(h <= cond_size && w <= cond_size, "subject condition larger than --cond_size");
  at::Tensor out = at::zeros({cond_size, cond_size, img.size(2)}, img.options());
  out.narrow(0, (cond_size - h) / 2, h).narrow(1, (cond_size - w) / 2, w).copy_(img);
  return out;
}

at::Tensor subject_condition(const at::Tensor& hwc_u8, int64_t cond_size, const SubjectAugment* aug) {
  return subject_finish(subject_resize(hwc_u8, cond_size), cond_size, aug);
}

at::Tensor spatial_condition(const at::Tensor& hwc_u8, int64_t cond_size) {
  return resize_rgb8(hwc_u8, cond_size, cond_size, ResizeFilter::Bilinear);
}

}  // namespace fluxtrain
