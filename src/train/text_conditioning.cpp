#include "train/text_conditioning.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "data/dataset.h"

namespace fluxtrain {

TextEncoderConditioning::TextEncoderConditioning(TextEncoders encoders, double lr_scale)
    : enc_(std::move(encoders)), lr_scale_(lr_scale) {}

TextConditioning TextEncoderConditioning::text(const std::vector<const Sample*>& samples, c10::Device device,
                                               at::ScalarType dtype, bool training) {
  std::vector<std::string> captions;
  for (const Sample* s : samples) captions.push_back(s->caption);
  // Validation draws no gradients; training keeps the graph into the LoRA masters.
  torch::autograd::AutoGradMode grad(training && torch::autograd::GradMode::is_enabled());
  const TextEncoding e = enc_.encode(captions);
  const auto opts = at::TensorOptions().device(device).dtype(dtype);
  return {e.prompt_embeds.to(opts), e.pooled_prompt_embeds.to(opts)};
}

std::vector<ParamGroup> TextEncoderConditioning::param_groups() {
  std::vector<ParamGroup> g;
  if (!enc_.clip_lora_parameters().empty()) g.push_back({"text_encoder_one", enc_.clip_lora_parameters(), lr_scale_});
  if (!enc_.t5_lora_parameters().empty()) g.push_back({"text_encoder_two", enc_.t5_lora_parameters(), lr_scale_});
  return g;
}

}  // namespace fluxtrain
