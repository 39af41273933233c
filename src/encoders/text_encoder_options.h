// The text-encoder options of `fluxtrain train` (EasyControl's / the memory guide's flag names):
// which encoders train a LoRA, its rank/alpha/learning rate, where the encoders run and how many
// T5 tokens a caption gets. add_text_encoder_options() declares them for Boost.Program_options.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace boost::program_options {
class options_description;
}

namespace fluxtrain {

struct TextEncoderOptions {
  bool train_text_encoder = false;           // LoRA on CLIP and T5
  bool train_text_encoder_one_only = false;  // LoRA on CLIP only (T5 frozen)
  int64_t text_encoder_rank = 64;
  double text_encoder_alpha = 64;
  double text_encoder_lr = 5e-6;
  std::string text_encoder_device;  // "" = the training device; "cpu", "cuda", "cuda:N"
  int64_t max_sequence_length = 512;

  bool trains_clip() const { return train_text_encoder || train_text_encoder_one_only; }
  bool trains_t5() const { return train_text_encoder; }
  // With neither mode the trainer uses cached embeddings and loads no encoder.
  bool needs_encoders() const { return trains_clip() || trains_t5(); }
  void validate() const;  // Error naming the flag
  nlohmann::json to_json() const;
};

void add_text_encoder_options(boost::program_options::options_description& desc, TextEncoderOptions& o);

class OptionSet;
// The same options in a subcommand's option table (`train`): the "Text encoders" group.
void declare_options(OptionSet& s, TextEncoderOptions& o);

}  // namespace fluxtrain
