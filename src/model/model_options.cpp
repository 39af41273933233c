#include "model/model_options.h"

#include "core/error.h"
#include "core/options.h"

namespace fluxtrain {

void declare_options(OptionSet& s, ModelConfig& c, bool training) {
  s.group("General", "model").section("model")
      .add("device", &c.device, training ? "auto | cpu | cuda" : "cpu, cuda or cuda:N",
           training ? rules::one_of({"auto", "cpu", "cuda"}) : Rule<std::string>());
  auto& g = s.group("Model", "model");
  g.add("pretrained_model_name_or_path", &c.pretrained_model_name_or_path,
        "FLUX.1 snapshot directory, diffusers transformer folder or BFL .safetensors file (required)")
      .add("model_layout", &c.model_layout, "auto | bfl | diffusers", rules::one_of({"auto", "bfl", "diffusers"}));
  if (training)
    g.add("mixed_precision", &c.mixed_precision,
          "no (float32) | bf16: dtype of the frozen weights and activations; LoRA masters stay float32",
          [](const std::string& f, const std::string& v) {
            if (v == "fp16") throw Error(f + " fp16 is not supported (no loss scaling); use bf16 or no");
            rules::one_of({"no", "bf16"})(f, v);
          });
  g.add("gradient_checkpointing", &c.gradient_checkpointing, "recompute each block in backward");
  g.add("checkpoint_attention", &c.checkpoint_attention,
        "auto | on | off: with --gradient_checkpointing, keep each block's attention output for backward "
        "instead of recomputing it (faster; about one hidden-size activation per token and block); auto: on "
        "unless fp8 base weights, block streaming or --max_gpu_memory are in use",
        rules::one_of({"auto", "on", "off"}));
  if (training)
    g.add("guidance_scale", &c.guidance_scale, "guidance value fed to guidance-embedding models during training",
          rules::finite());
}

bool checkpoint_attention_enabled(const std::string& value, bool low_memory) {
  if (value != "auto" && value != "on" && value != "off")
    throw Error("--checkpoint_attention must be auto, on or off, got '" + value + "'");
  return value == "on" || (value == "auto" && !low_memory);
}

}  // namespace fluxtrain
