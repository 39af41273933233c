#include "model/lora_format.h"

#include <set>
#include <sstream>

#include <ATen/ATen.h>

#include "core/error.h"
#include "model/flux_config.h"
#include "model/lora.h"

namespace fluxtrain {

std::string lora_format_name(LoraFormat f) { return f == LoraFormat::EasyControl ? "easycontrol" : "diffusers"; }

namespace {

// EasyControl: the processor module per target (q/k/v of both block kinds, the double blocks'
// output projection).
std::string easycontrol_module(const std::string& target) {
  if (target == "to_q") return "q_loras";
  if (target == "to_k") return "k_loras";
  if (target == "to_v") return "v_loras";
  if (target == "to_out.0") return "proj_loras";
  return "";
}

// diffusers: "transformer_blocks.3.attn.to_q", "single_transformer_blocks.0.proj_out".
std::string diffusers_path(const FluxConfig& c, int block, const std::string& t) {
  const bool dbl = block < c.depth;
  const std::string head = dbl ? "transformer_blocks." + std::to_string(block)
                               : "single_transformer_blocks." + std::to_string(block - c.depth);
  const bool in_attn = t.rfind("to_", 0) == 0 || t.rfind("add_", 0) == 0;
  return head + (in_attn ? ".attn." : ".") + t;
}

}  // namespace

std::string lora_key_stem(const FluxConfig& cfg, const LoraAdapter& a, LoraFormat f) {
  if (f == LoraFormat::EasyControl) {
    const std::string m = easycontrol_module(a.target);
    if (a.cond < 0 || m.empty())
      throw Error("the EasyControl LoRA format holds only condition adapters on q, k, v and the double blocks' "
                  "output projection; " + a.target + " on every token is not one of them");
    const bool dbl = a.block < cfg.depth;
    const std::string head = dbl ? "transformer_blocks." + std::to_string(a.block)
                                 : "single_transformer_blocks." + std::to_string(a.block - cfg.depth);
    return head + ".attn.processor." + m + "." + std::to_string(a.cond);
  }
  if (a.cond >= 0)
    throw Error("an EasyControl condition LoRA acts on condition tokens only and has no diffusers/PEFT form "
                "(diffusers' FLUX LoRA acts on every token); save it in the easycontrol format");
  return "transformer." + diffusers_path(cfg, a.block, a.target);
}

std::string lora_down_suffix(LoraFormat f) { return f == LoraFormat::EasyControl ? ".down.weight" : ".lora_A.weight"; }
std::string lora_up_suffix(LoraFormat f) { return f == LoraFormat::EasyControl ? ".up.weight" : ".lora_B.weight"; }

TensorMap export_lora(const FluxConfig& cfg, const LoraSet& set, LoraFormat f) {
  TensorMap m;
  for (const auto& a : set.adapters()) {
    const std::string stem = lora_key_stem(cfg, a, f);
    m.emplace(stem + lora_down_suffix(f), a.down.detach());
    m.emplace(stem + lora_up_suffix(f), a.up.detach());
  }
  return m;
}

void import_lora(const FluxConfig& cfg, LoraSet& set, const TensorMap& tensors, LoraFormat f, const std::string& file) {
  std::set<std::string> used;
  for (auto& a : set.adapters()) {
    const std::string stem = lora_key_stem(cfg, a, f);
    for (int which = 0; which < 2; ++which) {
      const std::string key = stem + (which == 0 ? lora_down_suffix(f) : lora_up_suffix(f));
      at::Tensor& dst = which == 0 ? a.down : a.up;
      auto it = tensors.find(key);
      if (it == tensors.end()) throw Error(file + ": missing LoRA key " + key);
      if (it->second.sizes() != dst.sizes()) {
        std::ostringstream ss;
        ss << file << ": LoRA key " << key << ": expected shape " << dst.sizes() << ", found " << it->second.sizes();
        throw Error(ss.str());
      }
      at::NoGradGuard ng;
      dst.copy_(it->second);
      used.insert(key);
    }
  }
  for (const auto& kv : tensors)
    if (!used.count(kv.first)) throw Error(file + ": unexpected LoRA key " + kv.first);
}

}  // namespace fluxtrain
