// `prepare --cache_text_embeddings`: the text encoders of the snapshot (CLIP-L and T5, frozen, no
// LoRA) behind prepare's TextEncoderHook (data/prepare.h), so that prepare stays independent of
// the encoders and its tests can use a stand-in.
#pragma once
#include <memory>
#include <string>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "data/prepare.h"

namespace fluxtrain {

class TextEncoders;

struct PrepareTextEncoders {
  std::shared_ptr<TextEncoders> encoders;  // kept alive by hook.encode
  TextEncoderHook hook;
};

// Loads tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/ from snapshot_dir. The hook's
// identity (part of every sample's content hash) names the encoder files (names, sizes,
// modification times), the T5 length and the dtype: changing any of them re-encodes.
PrepareTextEncoders load_prepare_text_encoders(const std::string& snapshot_dir, int64_t max_sequence_length,
                                               at::ScalarType dtype, c10::Device device);

}  // namespace fluxtrain
