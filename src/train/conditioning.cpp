#include "train/conditioning.h"

#include <ATen/ATen.h>

#include "data/dataset.h"

namespace fluxtrain {

bool CachedTextConditioning::host_text(const std::vector<const Sample*>& samples, at::ScalarType dtype,
                                       TextConditioning* out) const {
  std::vector<at::Tensor> t5, pooled;
  for (const Sample* s : samples) {
    t5.push_back(s->t5);
    pooled.push_back(s->pooled);
  }
  *out = {at::stack(t5).to(dtype), at::stack(pooled).to(dtype)};
  return true;
}

TextConditioning CachedTextConditioning::text(const std::vector<const Sample*>& samples, c10::Device device,
                                              at::ScalarType dtype, bool) {
  TextConditioning host;
  host_text(samples, dtype, &host);
  return {host.prompt_embeds.to(device), host.pooled.to(device)};
}

}  // namespace fluxtrain
