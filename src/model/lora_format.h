// LoRA file formats: how an adapter (block, target, condition) is named in a file. Adapter
// creation (model/lora.cpp) knows only targets and shapes; every key name lives here, one table
// per format, used by the LoRA output file, the checkpoint and --lora loading.
//
//   easycontrol  EasyControl's own: "transformer_blocks.{i}.attn.processor.{q,k,v,proj}_loras.{n}
//                .{down,up}.weight", "single_transformer_blocks.{j}.attn.processor.{q,k,v}_loras...";
//                condition adapters only (each acts on condition n's tokens)
//   diffusers    diffusers/PEFT: "transformer.<diffusers module path>.lora_{A,B}.weight";
//                adapters on every token (standard mode)
// (kohya/ComfyUI is the next row of this table.)
#pragma once
#include <string>
#include <vector>

#include "core/tensor_map.h"

namespace fluxtrain {

struct FluxConfig;
struct LoraAdapter;
class LoraSet;

enum class LoraFormat { EasyControl, Diffusers };
std::string lora_format_name(LoraFormat f);

// Key stem of an adapter in a format ("...q_loras.0", "transformer.transformer_blocks.3.attn.to_q");
// throws when the format cannot express the adapter.
std::string lora_key_stem(const FluxConfig& cfg, const LoraAdapter& a, LoraFormat f);
// Suffixes of the down (A) and up (B) matrices.
std::string lora_down_suffix(LoraFormat f);
std::string lora_up_suffix(LoraFormat f);

// All adapters' weights under the format's keys (detached, as stored).
TensorMap export_lora(const FluxConfig& cfg, const LoraSet& set, LoraFormat f);
// Copies weights from a file's tensors into the adapters; strict on keys and shapes (every key
// used, none missing). `file` names the source in errors.
void import_lora(const FluxConfig& cfg, LoraSet& set, const TensorMap& tensors, LoraFormat f, const std::string& file);

}  // namespace fluxtrain
