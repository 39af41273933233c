// Per-sample random draws of the data side and the condition-image transforms of EasyControl.
//
// Every draw of sample i in epoch e comes from one generator seeded by (seed, Augment, e, i), read
// in a fixed order (caption dropout, then per condition column: variant, flip, angle). So a sample
// gets the same caption dropout and the same subject transform whatever the batch layout, the
// rank count, or whether the run was resumed. `prepare --augment_variants N` uses the same draws
// with e = variant number (and prepare's seed) to make the cached variants.
#pragma once
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fluxtrain {

// EasyControl's subject augmentation: RandomHorizontalFlip(p=0.7), RandomRotation(20 degrees).
struct SubjectAugment {
  bool flip = false;
  double angle_deg = 0;  // counter-clockwise, in [-20, 20]
};

struct SampleDraws {
  bool drop_caption = false;
  std::vector<int64_t> variant;        // per condition column: cached variant to use
  std::vector<SubjectAugment> subject;  // per condition column (used for subject columns)
};

// num_variants[k]: cached variants of column k (1 = none). caption_dropout: probability.
SampleDraws draw_sample(uint64_t seed, uint64_t epoch, uint64_t sample, double caption_dropout,
                        const std::vector<int64_t>& num_variants);

constexpr double kSubjectFlipP = 0.7;
constexpr double kSubjectMaxAngle = 20.0;

// Subject condition, as EasyControl's subject transform: resized (Pillow bilinear) so that the
// longer side is cond_size and each side is rounded to a multiple of 16, then (aug given)
// flipped and rotated about the centre (nearest, expand=False, fill 0), then padded with 0 to
// cond_size x cond_size, centred. [H, W, 3] uint8 -> [cond, cond, 3] uint8.
at::Tensor subject_condition(const at::Tensor& hwc_u8, int64_t cond_size, const SubjectAugment* aug);
// Only the resize step (prepare stores this when augmentation happens online).
at::Tensor subject_resize(const at::Tensor& hwc_u8, int64_t cond_size);
// Flip, rotate, pad of an already resized subject image.
at::Tensor subject_finish(const at::Tensor& resized_hwc_u8, int64_t cond_size, const SubjectAugment* aug);

// Spatial condition: resized to cond_size x cond_size (Pillow bilinear; EasyControl's
// Resize((size, size)) + CenterCrop, the crop being a no-op).
at::Tensor spatial_condition(const at::Tensor& hwc_u8, int64_t cond_size);

// Rotation about the image centre by angle_deg (counter-clockwise), same size, nearest, fill 0.
at::Tensor rotate_nearest(const at::Tensor& hwc_u8, double angle_deg);

}  // namespace fluxtrain
