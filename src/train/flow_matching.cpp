#include "train/flow_matching.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/rng.h"

namespace fluxtrain {

at::Tensor pack_latents(const at::Tensor& x) {
  check_input(x.dim() == 4 && x.size(2) % 2 == 0 && x.size(3) % 2 == 0,
              "pack_latents: expected [B, C, h, w] with even h and w");
  const int64_t B = x.size(0), C = x.size(1), h = x.size(2), w = x.size(3);
  return x.view({B, C, h / 2, 2, w / 2, 2}).permute({0, 2, 4, 1, 3, 5}).reshape({B, (h / 2) * (w / 2), C * 4});
}

at::Tensor unpack_latents(const at::Tensor& x, int64_t h, int64_t w) {
  const int64_t B = x.size(0), C = x.size(2) / 4;
  return x.view({B, h / 2, w / 2, C, 2, 2}).permute({0, 3, 1, 4, 2, 5}).reshape({B, C, h, w});
}

at::Tensor sample_noise(const std::vector<int64_t>& shape, uint64_t seed, uint64_t epoch, uint64_t sample_index) {
  auto gen = cpu_generator(derive_seed(seed, RngPurpose::Noise, epoch, sample_index));
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
}

namespace {
at::Tensor per_sample_view(const at::Tensor& s, const at::Tensor& like) {
  std::vector<int64_t> shape(static_cast<size_t>(like.dim()), 1);
  shape[0] = like.size(0);
  return s.to(like.scalar_type()).view(shape);
}
}  // namespace

at::Tensor noisy_latents(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& sigma) {
  const at::Tensor s = per_sample_view(sigma, x);
  return (1 - s) * x + s * noise.to(x.scalar_type());
}

at::Tensor flow_target(const at::Tensor& x, const at::Tensor& noise) { return noise.to(x.scalar_type()) - x; }

at::Tensor per_sample_mse(const at::Tensor& pred, const at::Tensor& target) {
  const at::ScalarType acc = (pred.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const at::Tensor d = pred.to(acc) - target.to(acc);
  return (d * d).reshape({d.size(0), -1}).mean(1);
}

}  // namespace fluxtrain
