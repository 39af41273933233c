#include "encoders/text_encoder_options.h"

#include <cmath>

#include <boost/program_options.hpp>

#include "core/error.h"
#include "core/options.h"

namespace po = boost::program_options;

namespace fluxtrain {

void TextEncoderOptions::validate() const {
  check_input(!(train_text_encoder && train_text_encoder_one_only),
              "--train_text_encoder and --train_text_encoder_one_only contradict each other: choose one");
  check_input(text_encoder_rank > 0, "--text_encoder_rank must be positive");
  check_input(std::isfinite(text_encoder_alpha) && text_encoder_alpha > 0, "--text_encoder_alpha must be positive");
  check_input(std::isfinite(text_encoder_lr) && text_encoder_lr > 0, "--text_encoder_lr must be positive");
  check_input(max_sequence_length >= 1 && max_sequence_length <= 512,
              "--max_sequence_length must be between 1 and 512 (T5's trained length), got " +
                  std::to_string(max_sequence_length));
  const std::string& d = text_encoder_device;
  check_input(d.empty() || d == "cpu" || d == "cuda" || d.rfind("cuda:", 0) == 0,
              "--text_encoder_device must be cpu, cuda or cuda:N, got '" + d + "'");
}

nlohmann::json TextEncoderOptions::to_json() const {
  return {{"train_text_encoder", train_text_encoder},
          {"train_text_encoder_one_only", train_text_encoder_one_only},
          {"text_encoder_rank", text_encoder_rank},
          {"text_encoder_alpha", text_encoder_alpha},
          {"text_encoder_lr", text_encoder_lr},
          {"text_encoder_device", text_encoder_device},
          {"max_sequence_length", max_sequence_length}};
}

void add_text_encoder_options(po::options_description& desc, TextEncoderOptions& o) {
  const TextEncoderOptions d;
  desc.add_options()
      ("train_text_encoder", po::bool_switch(&o.train_text_encoder), "train a LoRA on both text encoders (CLIP and T5)")
      ("train_text_encoder_one_only", po::bool_switch(&o.train_text_encoder_one_only),
       "train a LoRA on CLIP (text encoder one) only; T5 stays frozen")
      ("text_encoder_rank", po::value(&o.text_encoder_rank)->default_value(d.text_encoder_rank), "text encoder LoRA rank")
      ("text_encoder_alpha", po::value(&o.text_encoder_alpha)->default_value(d.text_encoder_alpha, "64"),
       "text encoder LoRA alpha (scale = alpha / rank)")
      ("text_encoder_lr", po::value(&o.text_encoder_lr)->default_value(d.text_encoder_lr, "5e-6"),
       "learning rate of the text encoder LoRA parameter group")
      ("text_encoder_device", po::value(&o.text_encoder_device)->default_value(""),
       "where the text encoders run: cpu, cuda[:N] (default: the training device)")
      ("max_sequence_length", po::value(&o.max_sequence_length)->default_value(d.max_sequence_length),
       "T5 tokens per caption (padded/truncated)");
}

void declare_options(OptionSet& s, TextEncoderOptions& o) {
  s.group("Text encoders (CLIP-L = one, T5-XXL = two; docs/encoders.md)", "text_encoder")
      .add("train_text_encoder", &o.train_text_encoder, "train LoRA on both text encoders")
      .add("train_text_encoder_one_only", &o.train_text_encoder_one_only,
           "train LoRA on text encoder one (CLIP) only; T5 stays frozen")
      .add("text_encoder_rank", &o.text_encoder_rank, "LoRA rank of the text encoders' adapters", rules::positive())
      .add("text_encoder_alpha", &o.text_encoder_alpha, "LoRA alpha of the text encoders (scale = alpha / rank)",
           rules::positive_number())
      .add("text_encoder_lr", &o.text_encoder_lr, "learning rate of the text encoders' LoRA (own parameter group)",
           rules::positive_number(), "5e-6")
      .add("text_encoder_device", &o.text_encoder_device, "where the encoders run: the training device (empty), cpu, "
           "cuda or cuda:N")
      .add("max_sequence_length", &o.max_sequence_length, "T5 tokens per caption (1..512)");
}

}  // namespace fluxtrain
