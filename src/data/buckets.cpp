#include "data/buckets.h"

#include <algorithm>
#include <cmath>
#include <map>

#include <ATen/ATen.h>

#include "core/error.h"
#include "data/image_io.h"

namespace fluxtrain {

std::vector<Bucket> make_buckets(int64_t noise_size, double max_aspect, int64_t step) {
  check_input(noise_size >= step, "--noise_size must be at least " + std::to_string(step));
  check_input(max_aspect >= 1.0, "bucket aspect limit must be >= 1");
  const int64_t area = noise_size * noise_size;
  std::map<int64_t, int64_t> widest_for_height;  // one bucket per height: the widest that fits
  for (int64_t w = step; w * step <= area; w += step) {
    const int64_t h = (area / w) / step * step;
    if (h < step) break;
    const double aspect = static_cast<double>(std::max(w, h)) / static_cast<double>(std::min(w, h));
    if (aspect > max_aspect + 1e-9) continue;
    auto it = widest_for_height.find(h);
    if (it == widest_for_height.end() || it->second < w) widest_for_height[h] = w;
  }
  std::vector<Bucket> out;
  for (const auto& [h, w] : widest_for_height) out.push_back({w, h});
  std::sort(out.begin(), out.end(), [](const Bucket& a, const Bucket& b) { return a.width < b.width; });
  check_input(!out.empty(), "no aspect bucket fits --noise_size " + std::to_string(noise_size));
  return out;
}

size_t choose_bucket(const std::vector<Bucket>& buckets, int64_t width, int64_t height) {
  check_input(width > 0 && height > 0, "image has no pixels");
  const double target = std::log(static_cast<double>(width) / static_cast<double>(height));
  size_t best = 0;
  double best_err = 1e300;
  for (size_t i = 0; i < buckets.size(); ++i) {
    const double err = std::abs(std::log(static_cast<double>(buckets[i].width) / buckets[i].height) - target);
    const bool better = err < best_err - 1e-12 ||
                        (std::abs(err - best_err) <= 1e-12 &&
                         buckets[i].width * buckets[i].height > buckets[best].width * buckets[best].height);
    if (better) {
      best = i;
      best_err = err;
    }
  }
  return best;
}

at::Tensor fit_to_bucket(const at::Tensor& hwc_u8, const Bucket& b) {
  const double H = static_cast<double>(hwc_u8.size(0)), W = static_cast<double>(hwc_u8.size(1));
  const double s = std::max(b.width / W, b.height / H);
  const int64_t rw = std::max(b.width, static_cast<int64_t>(std::lround(W * s)));
  const int64_t rh = std::max(b.height, static_cast<int64_t>(std::lround(H * s)));
  const at::Tensor r = resize_rgb8(hwc_u8, rw, rh, ResizeFilter::Bilinear);
  return r.narrow(0, (rh - b.height) / 2, b.height).narrow(1, (rw - b.width) / 2, b.width).contiguous();
}

}  // namespace fluxtrain
