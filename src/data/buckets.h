// Aspect-ratio buckets for target images: sizes with area <= noise_size^2 and sides multiples of
// 16, one per width (the tallest that fits), aspect ratios up to max_aspect either way. Each image
// goes to the bucket nearest its aspect ratio (in log ratio), is resized to cover it (Pillow
// bilinear) and centre-cropped, so nothing is stretched; the crop loses at most the aspect error.
#pragma once
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fluxtrain {

struct Bucket {
  int64_t width = 0, height = 0;
  bool operator==(const Bucket& o) const { return width == o.width && height == o.height; }
};

// Sorted by width. Throws Error when noise_size < 16.
std::vector<Bucket> make_buckets(int64_t noise_size, double max_aspect = 4.0, int64_t step = 16);
// Index of the bucket whose aspect ratio is nearest w/h (ties: the larger area).
size_t choose_bucket(const std::vector<Bucket>& buckets, int64_t width, int64_t height);
// Resize to cover the bucket, centre crop: [H, W, 3] uint8 -> [bucket.height, bucket.width, 3].
at::Tensor fit_to_bucket(const at::Tensor& hwc_u8, const Bucket& b);

}  // namespace fluxtrain
