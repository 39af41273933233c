// Options of the transformer a subcommand loads and runs: where it is, its layout, precision,
// device and activation checkpointing. Shared by `train`, `forward` and `bench`.
#pragma once
#include <string>

namespace fluxtrain {

class OptionSet;

struct ModelConfig {
  std::string pretrained_model_name_or_path;  // FLUX snapshot dir, diffusers folder or BFL file
  std::string model_layout = "auto";          // auto | bfl | diffusers
  std::string mixed_precision = "bf16";       // no (float32) | bf16; frozen weights + activations
  std::string device = "auto";                // auto | cpu | cuda
  bool gradient_checkpointing = false;
  double guidance_scale = 1.0;                // training guidance (guidance-embed models)
};

// Declares the model options in the "General" (device) and "Model" groups. `training`: also
// --mixed_precision and --guidance_scale (inference commands take --dtype instead).
void declare_options(OptionSet& s, ModelConfig& c, bool training = true);

}  // namespace fluxtrain
