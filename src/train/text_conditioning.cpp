#include "train/text_conditioning.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "core/error.h"
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

std::vector<ParamGroup> text_encoder_param_groups(const TextEncoders& enc, double lr_scale) {
  std::vector<ParamGroup> g;
  if (!enc.clip_lora_parameters().empty()) g.push_back({"text_encoder_one", enc.clip_lora_parameters(), lr_scale});
  if (!enc.t5_lora_parameters().empty()) g.push_back({"text_encoder_two", enc.t5_lora_parameters(), lr_scale});
  return g;
}

std::vector<ParamGroup> TextEncoderConditioning::param_groups() { return text_encoder_param_groups(enc_, lr_scale_); }

// ---------------------------------------------------------------------------------------------
EncoderProcessTextConditioning::EncoderProcessTextConditioning(dist::Communicator& comm, int encoder_rank,
                                                               std::unique_ptr<TextEncoders> encoders,
                                                               bool train_clip, bool train_t5)
    : enc_(std::move(encoders)),
      dte_(comm, encoder_rank, enc_.get(), train_clip, train_t5, at::kCPU),
      train_clip_(train_clip),
      train_t5_(train_t5) {}

void EncoderProcessTextConditioning::begin_batch(const std::vector<const Sample*>& samples, bool training) {
  if (backward_pending_) throw Error("encoder process: begin_batch before the previous end_batch", ErrorKind::Internal);
  std::vector<std::string> captions;
  row_.clear();
  for (const Sample* s : samples) {
    row_.emplace(s, static_cast<int64_t>(captions.size()));
    captions.push_back(s->caption);
  }
  // The same decision on every rank (grad mode and the flags are), as DistributedTextEncoding needs.
  const bool grad = training && at::GradMode::is_enabled() && (train_clip_ || train_t5_);
  torch::autograd::AutoGradMode mode(grad);
  scattered_ = dte_.forward(captions);
  backward_pending_ = grad;
  // The groups of a micro-batch each read rows of these copies; their gradients add up in the
  // copies' .grad(), which end_batch hands to the per-sample leaves in one backward.
  prompt_embeds_ = scattered_.prompt_embeds.detach().requires_grad_(grad && train_t5_);
  pooled_ = scattered_.pooled_prompt_embeds.detach().requires_grad_(grad && train_clip_);
}

TextConditioning EncoderProcessTextConditioning::text(const std::vector<const Sample*>& samples, c10::Device device,
                                                      at::ScalarType dtype, bool) {
  std::vector<int64_t> rows;
  for (const Sample* s : samples) {
    auto it = row_.find(s);
    if (it == row_.end()) throw Error("encoder process: a sample outside begin_batch's micro-batch", ErrorKind::Internal);
    rows.push_back(it->second);
  }
  const at::Tensor idx = at::tensor(rows, at::TensorOptions().dtype(at::kLong));
  const auto opts = at::TensorOptions().device(device).dtype(dtype);
  return {prompt_embeds_.index_select(0, idx).to(opts), pooled_.index_select(0, idx).to(opts)};
}

void EncoderProcessTextConditioning::end_batch(double scale) {
  if (!backward_pending_) return;  // no gradients travel (validation, frozen encoders)
  backward_pending_ = false;
  std::vector<at::Tensor> outs, grads;
  if (prompt_embeds_.requires_grad() && prompt_embeds_.grad().defined()) {
    outs.push_back(scattered_.prompt_embeds);
    grads.push_back(prompt_embeds_.grad());
  }
  if (pooled_.requires_grad() && pooled_.grad().defined()) {
    outs.push_back(scattered_.pooled_prompt_embeds);
    grads.push_back(pooled_.grad());
  }
  // Fills the per-sample leaves' .grad() (a rank that computed nothing sends zeros), then the
  // encoder process runs the encoders' backward once for the global batch.
  if (!outs.empty()) torch::autograd::backward(outs, grads);
  dte_.backward(scale);
  scattered_ = {};
  prompt_embeds_ = pooled_ = at::Tensor();
  row_.clear();
}

}  // namespace fluxtrain
