// LoRA weight files (.safetensors). EasyControl mode writes EasyControl's own keys
// (transformer_blocks.{i}.attn.processor.q_loras.{n}.down.weight ...), standard mode the
// diffusers/peft keys (transformer.<module>.lora_A.weight / lora_B.weight). The metadata
// records mode, ranks and alphas so that a file is self-describing; files without it
// (EasyControl's own) are read from their keys, with alphas from the caller (default = rank).
#pragma once
#include <string>
#include <vector>

#include "model/lora.h"

namespace fluxtrain {

void save_lora_file(const std::string& path, const LoraSet& lora);
// alphas: used only when the file has no metadata; empty = alpha equals rank (scale 1).
LoraSet load_lora_file(const std::string& path, const FluxConfig& cfg, const std::vector<double>& alphas = {});

}  // namespace fluxtrain
