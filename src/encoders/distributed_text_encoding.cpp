#include "encoders/distributed_text_encoding.h"

#include <ATen/ATen.h>

#include <cstring>

#include "core/error.h"

namespace fluxtrain {
namespace {

at::Tensor caption_bytes(const std::string& s) {
  at::Tensor t = at::empty({static_cast<int64_t>(s.size())}, at::kByte);
  if (!s.empty()) std::memcpy(t.data_ptr(), s.data(), s.size());
  return t;
}

std::string caption_of(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU).contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel()));
}

}  // namespace

DistributedTextEncoding::DistributedTextEncoding(dist::Communicator& comm, int encoder_rank, TextEncoders* encoders,
                                                 bool train_clip, bool train_t5, at::Device device)
    : er_(comm, encoder_rank, device), enc_(encoders), train_clip_(train_clip), train_t5_(train_t5), device_(device) {
  if (er_.is_encoder())
    check_input(enc_ != nullptr && enc_->has_clip() && enc_->has_t5(),
                "encoder rank: the text encoders (CLIP and T5) must be loaded on --encoder_rank");
}

TextEncoding DistributedTextEncoding::forward(const std::vector<std::string>& captions) {
  dist::SampleMaps inputs;
  for (const auto& c : captions) inputs.push_back({{"caption", caption_bytes(c)}});
  const bool grad = at::GradMode::is_enabled() && (train_clip_ || train_t5_);
  TextEncoders* enc = enc_;
  auto encode = [enc](const dist::SampleMaps& global) {
    std::vector<std::string> all;
    for (const auto& s : global) all.push_back(caption_of(s.at("caption")));
    const TextEncoding e = enc->encode(all);
    dist::SampleMaps out;
    for (int64_t i = 0; i < static_cast<int64_t>(all.size()); ++i)
      out.push_back({{"prompt_embeds", e.prompt_embeds[i]}, {"pooled_prompt_embeds", e.pooled_prompt_embeds[i]}});
    return out;
  };
  outputs_ = er_.forward(inputs, encode, grad);
  // Outputs of a frozen encoder need no gradient here (and none is sent back for them).
  for (auto& m : outputs_) {
    if (!train_t5_ && m.at("prompt_embeds").requires_grad()) m.at("prompt_embeds").requires_grad_(false);
    if (!train_clip_ && m.at("pooled_prompt_embeds").requires_grad()) m.at("pooled_prompt_embeds").requires_grad_(false);
  }
  TextEncoding out;
  if (outputs_.empty()) {
    // No samples on this rank: empty batches of the right dtype (sizes unknown here: [0, 0, 0]).
    out.prompt_embeds = at::empty({0, 0, 0}, at::TensorOptions().device(device_));
    out.pooled_prompt_embeds = at::empty({0, 0}, at::TensorOptions().device(device_));
    return out;
  }
  std::vector<at::Tensor> pe, pooled;
  for (const auto& m : outputs_) {
    pe.push_back(m.at("prompt_embeds"));
    pooled.push_back(m.at("pooled_prompt_embeds"));
  }
  out.prompt_embeds = at::stack(pe);  // differentiable: each sample leaf gets its slice's gradient
  out.pooled_prompt_embeds = at::stack(pooled);
  return out;
}

void DistributedTextEncoding::backward(double scale) {
  dist::SampleMaps grads = dist::EncoderRank::grads_of(outputs_);
  // Only the trained encoder's outputs travel back.
  for (auto& g : grads) {
    if (!train_t5_) g.erase("prompt_embeds");
    if (!train_clip_) g.erase("pooled_prompt_embeds");
  }
  er_.backward(grads, scale);
  outputs_.clear();
}

}  // namespace fluxtrain
