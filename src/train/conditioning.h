// The conditioning step: between a batch and the transformer, the text conditioning of each
// sample (T5 hidden states and the CLIP pooled vector). The trainer asks a Conditioner and
// never looks at where the embeddings come from:
//   CachedTextConditioning  the dataset's pre-computed embeddings (today's datasets)
//   text encoders           CLIP/T5 run on the captions, with or without a LoRA (encoders issue);
//                           under mpirun on the encoder process, scattered to the ranks
// A conditioner with trainable parts (a text-encoder LoRA) hands its parameter groups to the
// optimizer, and its outputs carry the graph back into them.
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "train/optimizer.h"

namespace fluxtrain {

struct Sample;

struct TextConditioning {
  at::Tensor prompt_embeds;  // [B, T, context_in_dim] (T5)
  at::Tensor pooled;         // [B, vec_in_dim] (CLIP pooled)
};

class Conditioner {
 public:
  virtual ~Conditioner() = default;
  // The conditioning of equally shaped samples, on `device` in `dtype`. `training`: gradients
  // may flow into the conditioner's own parameters.
  virtual TextConditioning text(const std::vector<const Sample*>& samples, c10::Device device, at::ScalarType dtype,
                                bool training) = 0;
  // The same conditioning on the host (CPU tensors in `dtype`) when it needs no model (cached
  // embeddings): callable from the prefetch thread. False: ask text() on the training thread.
  virtual bool host_text(const std::vector<const Sample*>& /*samples*/, at::ScalarType /*dtype*/,
                         TextConditioning* /*out*/) const {
    return false;
  }
  // Parameters the conditioner trains (none for cached embeddings), for the run's optimizer.
  virtual std::vector<ParamGroup> param_groups() { return {}; }

  // A conditioner that encodes a whole micro-batch at once (the encoder process under mpirun):
  // begin_batch before the first text() of a micro-batch, end_batch after its last backward.
  // Both are collective for such a conditioner: every rank calls them once per micro-batch, also
  // a rank that skips the computation (non-finite loss). scale: the factor of this rank's loss
  // in the update's loss (1 / ranks: the mean). Defaults: nothing to do.
  virtual void begin_batch(const std::vector<const Sample*>& /*samples*/, bool /*training*/) {}
  virtual void end_batch(double /*scale*/) {}
};

// Passes the dataset's cached embeddings through.
class CachedTextConditioning final : public Conditioner {
 public:
  TextConditioning text(const std::vector<const Sample*>& samples, c10::Device device, at::ScalarType dtype,
                        bool training) override;
  bool host_text(const std::vector<const Sample*>& samples, at::ScalarType dtype, TextConditioning* out) const override;
};

}  // namespace fluxtrain
