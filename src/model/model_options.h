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
  // With gradient_checkpointing: keep each block's attention results for backward instead of
  // recomputing them (model/recompute.h). auto: on, unless the low-memory engine is in use.
  std::string checkpoint_attention = "auto";  // auto | on | off
  double guidance_scale = 1.0;                // training guidance (guidance-embed models)
};

// Declares the model options in the "General" (device) and "Model" groups. `training`: also
// --mixed_precision and --guidance_scale (inference commands take --dtype instead).
void declare_options(OptionSet& s, ModelConfig& c, bool training = true);

// --checkpoint_attention resolved: "auto" keeps attention results unless low_memory (fp8 base
// weights, block streaming or a --max_gpu_memory budget: memory is what the run is short of).
// Any other value throws, naming the flag (commands that parse it themselves: bench, estimate).
bool checkpoint_attention_enabled(const std::string& value, bool low_memory);

}  // namespace fluxtrain
