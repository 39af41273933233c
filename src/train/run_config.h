// Configuration of `fluxtrain train`: the parts' option structs side by side, filled from the
// command line and an optional INI file (--config FILE; the command line wins). Each part
// declares its own options (declare_options beside its struct); this file adds only the checks
// that span parts and the parsing entry point. The resolved JSON is stored in every checkpoint.
//
// Option names and defaults follow EasyControl's train.py where it has the option.
#pragma once
#include <iosfwd>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "data/data_options.h"
#include "dist/dist_options.h"
#include "dist/low_memory_options.h"
#include "encoders/text_encoder_options.h"
#include "model/lora.h"
#include "model/model_options.h"
#include "train/train_options.h"

namespace fluxtrain {

struct RunConfig {
  std::string config_file;  // the INI it came from, if any
  ModelConfig model;
  LoraConfig lora;
  DataConfig data;
  TrainConfig train;
  CheckpointConfig checkpoint;
  ValidationConfig validation;
  TextEncoderOptions text_encoder;
  DistConfig dist;
  dist::LowMemoryOptions low_memory;
  DebugConfig debug;

  // Every option's own rule, then the checks across options; throws Error naming the flag.
  void validate() const;
  nlohmann::json to_json() const;
};

struct ParsedArgs {
  bool help = false;      // --help was printed; nothing else to do
  RunConfig config;
};

// Parses `fluxtrain train` arguments; argv[0] is the program/subcommand name. Prints --help to
// `out`. Throws Error (one line, naming the flag or the INI file) on anything unknown or invalid.
ParsedArgs parse_train_args(int argc, const char* const* argv, std::ostream& out);

}  // namespace fluxtrain
