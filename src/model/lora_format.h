// LoRA file formats: how an adapter (block, target, condition) is named in a file. Adapter
// creation (model/lora.cpp) knows only targets and shapes; every key name lives here, one table
// per format, used by the LoRA output files, the checkpoint, --lora loading and convert-lora.
// docs/lora-formats.md has the tables and what each client does with alpha.
//
//   easycontrol  EasyControl's own: "transformer_blocks.{i}.attn.processor.{q,k,v,proj}_loras.{n}
//                .{down,up}.weight", "single_transformer_blocks.{j}.attn.processor.{q,k,v}_loras...";
//                condition adapters only (each acts on condition n's tokens)
//   diffusers    diffusers/PEFT: "transformer.<diffusers module path>.lora_{A,B}.weight";
//                adapters on every token (standard mode); alpha in the header (lora_io.cpp)
//   kohya        kohya sd-scripts / ComfyUI: "lora_unet_<BFL module, '.' -> '_'>.lora_{down,up}.weight"
//                and ".alpha"; one module per fused BFL linear: the adapters on its row slices
//                (q, k, v [, mlp]) stacked, downs concatenated along the rank, ups block-diagonal
//
// Condition adapters exist only in the easycontrol format, every-token adapters only in the
// other two; a conversion across that line is an error that says so.
#pragma once
#include <string>
#include <vector>

#include "core/tensor_map.h"

namespace fluxtrain {

struct FluxConfig;
struct LoraAdapter;
class LoraSet;

enum class LoraFormat { EasyControl, Diffusers, Kohya };
std::string lora_format_name(LoraFormat f);  // "easycontrol" | "diffusers" | "kohya"
// Parses one of the names above; `flag` names the source in the error.
LoraFormat parse_lora_format(const std::string& name, const std::string& flag);

// Key stem of an adapter in the easycontrol or diffusers format ("...q_loras.0",
// "transformer.transformer_blocks.3.attn.to_q"), or of its fused module in kohya
// ("lora_unet_double_blocks_3_img_attn_qkv"); throws when the format cannot express the adapter.
std::string lora_key_stem(const FluxConfig& cfg, const LoraAdapter& a, LoraFormat f);
// kohya's module name of a BFL linear in a block: "lora_unet_single_blocks_0_linear1".
std::string kohya_module_name(const FluxConfig& cfg, int block, const std::string& linear);
// Output features of a fused BFL linear ("img_attn.qkv" -> 3H, "linear1" -> 3H + mlp, ...).
int64_t bfl_linear_out_features(const FluxConfig& cfg, const std::string& linear);
// Suffixes of the down (A) and up (B) matrices.
std::string lora_down_suffix(LoraFormat f);
std::string lora_up_suffix(LoraFormat f);

// Which format a file's keys are in: kohya (".lora_down.weight"), diffusers (".lora_A.weight"
// under "transformer."), easycontrol ("...processor.q_loras..."). Throws naming `file` if none.
LoraFormat detect_lora_format(const std::vector<std::string>& keys, const std::string& file);

// All adapters' weights under the format's keys (detached, as stored). kohya adds one float32
// ".alpha" scalar per module, chosen so that alpha / (stacked rank) equals the adapters' scale.
// Throws for a condition LoRA in kohya/diffusers and an every-token LoRA in easycontrol.
TensorMap export_lora(const FluxConfig& cfg, const LoraSet& set, LoraFormat f);
// Copies weights from a file's tensors into the adapters; strict on keys and shapes (every key
// used, none missing). kohya modules may be stacked (rank = sum of the adapters', block-diagonal
// up) or dense (each adapter's rank, one down shared by the slices); a kohya alpha that disagrees
// with the adapters' scale is an error. `file` names the source in errors.
void import_lora(const FluxConfig& cfg, LoraSet& set, const TensorMap& tensors, LoraFormat f, const std::string& file);

}  // namespace fluxtrain
