#include "train/run_config.h"

#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/options.h"

namespace fluxtrain {
namespace {

// The option table of `train`, bound to c. Groups are created in --help order.
void declare_all(OptionSet& s, RunConfig& c) {
  for (const char* g : {"General", "Model", "LoRA", "Data", "Optimisation", "Learning-rate schedule", "Timesteps",
                        "Checkpoints", "Validation"})
    s.group(g);
  declare_options(s, c.checkpoint);
  declare_options(s, c.train);
  declare_options(s, c.model);
  declare_options(s, c.lora);
  declare_options(s, c.data);
  declare_options(s, c.validation);
  declare_options(s, c.text_encoder);
  declare_options(s, c.dist);
  declare_options(s, c.low_memory);
  declare_options(s, c.debug);
}

// Checks that involve more than one option (each option's own range is its rule).
void check_across(const RunConfig& c) {
  auto need = [](bool ok, const std::string& msg) {
    if (!ok) throw Error(msg);
  };
  need(!c.model.pretrained_model_name_or_path.empty(), "--pretrained_model_name_or_path is required");
  c.lora.validate();
  c.low_memory.validate();
  c.text_encoder.validate();
  need(!c.data.train_data.empty(), "--train_data is required (an HDF5 dataset, see docs/dataset.md)");
  if (c.train.max_train_steps == 0)
    need(c.train.num_train_epochs > 0,
         "--num_train_epochs must be positive, got " + std::to_string(c.train.num_train_epochs));
  if (c.train.max_train_steps > 0 && (c.train.lr_scheduler == "linear" || c.train.lr_scheduler == "cosine"))
    need(c.train.lr_warmup_steps < c.train.max_train_steps,
         "--lr_warmup_steps " + std::to_string(c.train.lr_warmup_steps) + " must be below --max_train_steps " +
             std::to_string(c.train.max_train_steps) + " for --lr_scheduler " + c.train.lr_scheduler);
  need(!(c.text_encoder.train_text_encoder && c.text_encoder.train_text_encoder_one_only),
       "--train_text_encoder and --train_text_encoder_one_only contradict each other: choose one "
       "(both encoders, or text encoder one only)");
}

}  // namespace

ParsedArgs parse_train_args(int argc, const char* const* argv, std::ostream& out) {
  ParsedArgs result;
  RunConfig& c = result.config;
  OptionSet s("train", "fluxtrain train: LoRA training of FLUX.1 (EasyControl condition LoRA or plain LoRA)");
  s.allow_config_file(&c.config_file);
  declare_all(s, c);
  if (!s.parse(argc, argv, out)) {
    result.help = true;
    return result;
  }
  if (!c.train.seed_given) {
    // Unseeded runs are still reproducible: the drawn seed is printed and stored in checkpoints.
    std::random_device rd;
    c.train.seed = ((static_cast<uint64_t>(rd()) << 32) | rd()) & 0x7fffffffffffffffull;
  }
  check_across(c);
  return result;
}

void RunConfig::validate() const {
  RunConfig copy = *this;  // the table binds to fields; validate a copy
  OptionSet s("train");
  declare_all(s, copy);
  s.validate();
  check_across(copy);
}

nlohmann::json RunConfig::to_json() const {
  RunConfig copy = *this;
  OptionSet s("train");
  declare_all(s, copy);
  nlohmann::json j = s.json();
  j["config_file"] = config_file;
  j["train"]["seed_given"] = train.seed_given;
  return j;
}

}  // namespace fluxtrain
