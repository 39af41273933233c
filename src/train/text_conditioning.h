// The conditioning step with text encoders (src/encoders/text_encoders.h): CLIP-L's pooled
// output and T5's hidden states computed from the samples' captions, through the LoRA the run
// trains (--train_text_encoder: both encoders, --train_text_encoder_one_only: CLIP). Gradients
// reach only those LoRA masters; they form their own optimizer groups at --text_encoder_lr.
#pragma once
#include "encoders/text_encoders.h"
#include "train/conditioning.h"

namespace fluxtrain {

class TextEncoderConditioning final : public Conditioner {
 public:
  // lr_scale: --text_encoder_lr / --learning_rate (the groups follow the same schedule).
  TextEncoderConditioning(TextEncoders encoders, double lr_scale);
  TextConditioning text(const std::vector<const Sample*>& samples, c10::Device device, at::ScalarType dtype,
                        bool training) override;
  std::vector<ParamGroup> param_groups() override;
  TextEncoders& encoders() { return enc_; }

 private:
  TextEncoders enc_;
  double lr_scale_;
};

}  // namespace fluxtrain
