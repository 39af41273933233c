// The LoRA options (--lora_mode, --lora_num, --ranks, --network_alphas, --lora_targets,
// --lora_blocks, --lora_format), declared beside LoraConfig (model/lora.h). Cross-field checks: LoraConfig::validate.
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/limits.h"
#include "core/options.h"
#include "model/lora.h"

namespace fluxtrain {

std::string lora_mode_name(LoraMode m) { return m == LoraMode::EasyControl ? "easycontrol" : "standard"; }

void declare_options(OptionSet& s, LoraConfig& c) {
  s.group("LoRA", "lora")
      .add_custom("lora_mode", "easycontrol (per-condition LoRA on condition tokens) | standard (plain LoRA on --lora_targets)",
                  "easycontrol",
                  [&c](const std::string& f, const std::string& v) {
                    if (v == "easycontrol") c.mode = LoraMode::EasyControl;
                    else if (v == "standard") c.mode = LoraMode::Standard;
                    else throw Error(f + " must be easycontrol or standard, got '" + v + "'");
                  },
                  [&c] { return nlohmann::json(lora_mode_name(c.mode)); })
      .add("lora_num", &c.lora_num, "number of conditions, each with its own LoRA (easycontrol)",
           rules::in_range(1, limits::kMaxLoraNum))
      .add("ranks", &c.ranks, "LoRA rank (of the transformer's adapters), one per condition")
      .add("network_alphas", &c.alphas, "LoRA alpha, one per condition (scale = alpha / rank)")
      .add("lora_targets", &c.targets,
           "standard mode: diffusers linear names (to_q,to_k,to_v,to_out.0,add_q_proj,...,proj_mlp,proj_out)")
      .add("lora_blocks", &c.blocks, "standard mode: only these global block indices (default: all)",
           rules::in_range(0, limits::kMaxBlockIndex))
      .add("lora_format", &c.formats,
           "LoRA files written at the end: easycontrol, diffusers, kohya (ComfyUI), a list (default: the mode's "
           "own: easycontrol for --lora_mode easycontrol, diffusers for standard; docs/lora-formats.md)")
      .add("pretrained_lora_path", &c.pretrained_lora_path,
           "start from this LoRA file (easycontrol, diffusers or kohya keys) instead of a fresh initialisation; "
           "its adapters must match --lora_mode, --lora_num, --ranks and the targets");
}

}  // namespace fluxtrain
