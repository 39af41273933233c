// LoRA weight files (.safetensors) in any of the three formats of model/lora_format.h.
//
// Every file fluxtrain writes carries "fluxtrain_lora" metadata (mode, ranks, alphas, targets,
// blocks, format), so it reads back exactly. Alpha travels so that each client reads it:
//   diffusers  "lora_adapter_metadata" header (transformer.r / lora_alpha / target_modules), which
//              diffusers >= 0.35 turns into peft's LoraConfig; weights stay as trained (bit-exact)
//   kohya      a ".alpha" scalar per module (diffusers, ComfyUI, sd-scripts read it)
//   easycontrol  none in the keys (EasyControl passes network_alphas on its command line)
// Files from other tools (no fluxtrain_lora) are read from their keys: format auto-detected,
// rank from the shapes, alpha from the header/".alpha" keys, else the caller's alphas, else rank.
#pragma once
#include <string>
#include <vector>

#include "model/lora.h"
#include "model/lora_format.h"

namespace fluxtrain {

// `extra` (e.g. text-encoder LoRA tensors in the same naming scheme) is stored beside the
// transformer's keys; `extra_adapter_metadata` (a JSON object, e.g. "text_encoder.lora_alpha")
// joins diffusers' lora_adapter_metadata. Throws, before writing, if the format cannot hold the set.
void save_lora_file(const std::string& path, const LoraSet& lora, LoraFormat format, const TensorMap& extra = {},
                    const std::string& extra_adapter_metadata = "");
// The set's native format: easycontrol for condition LoRAs, diffusers for standard ones.
void save_lora_file(const std::string& path, const LoraSet& lora);
// The trainer's output: lora.safetensors in the native format, and lora_<format>.safetensors for
// every other name in `formats` (--lora_format). kohya_extra goes into the kohya file (the text
// encoders' lora_te1_/lora_te3_ modules). Returns the paths written.
std::vector<std::string> save_lora_files(const std::string& dir, const LoraSet& lora,
                                         const std::vector<std::string>& formats, const TensorMap& kohya_extra = {});
// alphas: used only when the file records no alpha; empty = alpha equals rank (scale 1).
// Keys of text-encoder LoRAs in the same file (text_encoder*, lora_te*) are left to
// load_text_encoder_lora_file.
LoraSet load_lora_file(const std::string& path, const FluxConfig& cfg, const std::vector<double>& alphas = {});
// The format a LoRA file is in (from its keys).
LoraFormat lora_file_format(const std::string& path);

// Output file name of a format beside the native one: "lora.safetensors" for the native format,
// "lora_<format>.safetensors" for the others.
std::string lora_file_name(LoraFormat format, LoraFormat native);
LoraFormat native_lora_format(const LoraConfig& c);

}  // namespace fluxtrain
