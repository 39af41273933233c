// The conditioning step with text encoders (src/encoders/text_encoders.h): CLIP-L's pooled
// output and T5's hidden states computed from the samples' captions, through the LoRA the run
// trains (--train_text_encoder: both encoders, --train_text_encoder_one_only: CLIP; neither: the
// frozen encoders, for datasets without cached embeddings). Gradients reach only those LoRA
// masters; they form their own optimizer groups at --text_encoder_lr.
//
// Two forms:
//   TextEncoderConditioning       one process: the encoders run here, group by group
//   EncoderProcessTextConditioning under mpirun: only --encoder_process holds the encoders
//                                 (encoders/distributed_text_encoding.h); each micro-batch is
//                                 encoded once for the global batch and scattered, and the
//                                 gradients of the states come back in end_batch. The LoRA
//                                 masters exist on the encoder process only, and their gradients
//                                 are already the sum over ranks: they are not the optimizer's
//                                 ordinary groups (train/encoder_process.h handles them).
#pragma once
#include <map>
#include <memory>

#include "encoders/distributed_text_encoding.h"
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

// The LoRA groups of loaded encoders (empty for frozen ones).
std::vector<ParamGroup> text_encoder_param_groups(const TextEncoders& enc, double lr_scale);

class EncoderProcessTextConditioning final : public Conditioner {
 public:
  // encoders: loaded on the encoder process, null on every other rank. train_clip / train_t5:
  // the run's mode (the same on every rank).
  EncoderProcessTextConditioning(dist::Communicator& comm, int encoder_rank, std::unique_ptr<TextEncoders> encoders,
                                 bool train_clip, bool train_t5);
  void begin_batch(const std::vector<const Sample*>& samples, bool training) override;
  TextConditioning text(const std::vector<const Sample*>& samples, c10::Device device, at::ScalarType dtype,
                        bool training) override;
  void end_batch(double scale) override;
  // None: the encoder process's groups are handed to the optimizer by train/encoder_process.h.
  std::vector<ParamGroup> param_groups() override { return {}; }
  TextEncoders* encoders() { return enc_.get(); }  // null off the encoder process

 private:
  std::unique_ptr<TextEncoders> enc_;
  DistributedTextEncoding dte_;
  bool train_clip_, train_t5_;
  TextEncoding scattered_;              // this rank's rows as DistributedTextEncoding returned them
  at::Tensor prompt_embeds_, pooled_;   // detached copies the groups read (leaves when trained)
  std::map<const Sample*, int64_t> row_;
  bool backward_pending_ = false;
};

}  // namespace fluxtrain
