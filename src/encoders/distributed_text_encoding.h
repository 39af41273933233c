// Text encoding under mpirun: only --encoder_rank holds the encoders. Every rank passes its own
// captions; the encoder rank tokenises and encodes the global batch once (rank 0's captions first,
// then rank 1's, ...) and scatters each rank its samples' T5 states and CLIP pooled vectors. When a
// text-encoder LoRA trains, backward() gathers each rank's gradients w.r.t. those outputs and the
// encoder rank runs the encoders' backward once for the global batch, so its LoRA masters get the
// gradient of scale * sum over ranks of the ranks' losses (scale 1/world: the mean).
// Built on dist/encoder_rank.h; other ranks need neither weights nor tokenizer files.
#pragma once
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "dist/encoder_rank.h"
#include "encoders/text_encoders.h"

namespace fluxtrain {

class DistributedTextEncoding {
 public:
  // encoders: the loaded encoders on the encoder rank, nullptr on every other rank.
  // train_clip / train_t5: which LoRA trains (the same on every rank; from TextEncoderOptions).
  // device: where outputs land on every rank (the communicator's device kind).
  DistributedTextEncoding(dist::Communicator& comm, int encoder_rank, TextEncoders* encoders, bool train_clip,
                          bool train_t5, at::Device device = at::kCPU);

  bool is_encoder_rank() const { return er_.is_encoder(); }

  // Collective. Returns this rank's prompt_embeds [b, L, d] and pooled_prompt_embeds [b, h]
  // (b may be 0). With a LoRA training and grad mode on, the trained outputs are leaves that
  // require grad: the caller's backward fills their .grad(), which backward() sends home.
  TextEncoding forward(const std::vector<std::string>& captions);

  // Collective, after every rank's own backward (a rank whose outputs got no gradient sends zeros).
  void backward(double scale);

 private:
  dist::EncoderRank er_;
  TextEncoders* enc_;
  bool train_clip_, train_t5_;
  at::Device device_;
  int64_t pooled_dim_ = 0, t5_len_ = 0, t5_dim_ = 0;
  dist::SampleMaps outputs_;  // this rank's per-sample leaves of the last forward
};

}  // namespace fluxtrain
