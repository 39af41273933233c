#include "train/conditioning.h"

#include <ATen/ATen.h>

#include "data/dataset.h"

namespace fluxtrain {

TextConditioning CachedTextConditioning::text(const std::vector<const Sample*>& samples, c10::Device device,
                                              at::ScalarType dtype, bool) {
  std::vector<at::Tensor> t5, pooled;
  for (const Sample* s : samples) {
    t5.push_back(s->t5);
    pooled.push_back(s->pooled);
  }
  const auto opts = at::TensorOptions().device(device).dtype(dtype);
  return {at::stack(t5).to(opts), at::stack(pooled).to(opts)};
}

}  // namespace fluxtrain
