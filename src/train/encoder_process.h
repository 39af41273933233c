// What a run encodes itself instead of reading it from the dataset, and where:
//   captions  with a text-encoder mode (--train_text_encoder, --train_text_encoder_one_only), or
//             frozen encoders when the dataset has no cached embeddings;
//   images    when the dataset stores pixels (`prepare` without --cache_latents).
// One process: the encoders run on the training device (--text_encoder_device for the text
// encoders). Under mpirun only --encoder_process loads them; it encodes each global micro-batch
// and scatters the results (train/text_conditioning.h, train/online_latents.h), and the
// text-encoder LoRA, which lives there only, gets its own optimizer
// (train/encoder_process_optimizer.h). Other ranks load no encoder weights.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <c10/core/ScalarType.h>

#include "train/conditioning.h"
#include "train/online_latents.h"

namespace fluxtrain {

namespace dist {
class Communicator;
}

struct RunConfig;
struct Runtime;
struct DatasetInfo;
class TextEncoders;

struct OnlineEncoding {
  std::unique_ptr<Conditioner> conditioner;  // cached embeddings, or one of the text conditioners
  std::unique_ptr<OnlineLatents> latents;    // null: the dataset has latents
  TextEncoders* text_encoders = nullptr;     // the encoders on this rank (null: none here)
  bool trains_text_encoder = false;          // a text-encoder LoRA trains (on some rank)
  bool encoder_process = false;              // ... on --encoder_process only, with its own optimizer
  std::vector<ParamGroup> encoder_process_groups;  // those LoRA groups, on the encoder process
  std::string description;                   // one phrase for the start line ("" when nothing online)
};

// Collective when ctl is given (every rank): "encoder weights per rank (bytes): a, b, ..." —
// what each rank holds of the text encoders and the autoencoder (only the encoder process under
// mpirun). ctl null: this process alone.
std::vector<int64_t> encoder_weight_bytes_per_rank(const OnlineEncoding& o, dist::Communicator* ctl);
std::string encoder_weights_per_rank(const std::vector<int64_t>& bytes);

// master: dtype of the LoRA masters (float64 in float64 runs, else float32).
OnlineEncoding make_online_encoding(const RunConfig& cfg, const Runtime& rt, const DatasetInfo& data,
                                    at::ScalarType master);

}  // namespace fluxtrain
