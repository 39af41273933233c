#include "model/lora_format.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <sstream>

#include <ATen/ATen.h>

#include "core/error.h"
#include "model/flux_config.h"
#include "model/lora.h"

namespace fluxtrain {

std::string lora_format_name(LoraFormat f) {
  switch (f) {
    case LoraFormat::EasyControl: return "easycontrol";
    case LoraFormat::Diffusers: return "diffusers";
    case LoraFormat::Kohya: return "kohya";
  }
  return "?";
}

LoraFormat parse_lora_format(const std::string& name, const std::string& flag) {
  if (name == "easycontrol") return LoraFormat::EasyControl;
  if (name == "diffusers" || name == "peft") return LoraFormat::Diffusers;
  if (name == "kohya" || name == "comfyui") return LoraFormat::Kohya;
  throw Error(flag + " must be easycontrol, diffusers or kohya, got '" + name + "'");
}

namespace {

// The one sentence users see when a condition LoRA meets a format for every token.
const char* kConditionOnly =
    "an EasyControl condition LoRA acts on condition tokens only; the kohya/ComfyUI and diffusers/PEFT "
    "formats apply a LoRA to every token and cannot express it: keep it in the easycontrol format";

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

std::string dots_to_underscores(std::string s) {
  for (char& ch : s)
    if (ch == '.') ch = '_';
  return s;
}

// The adapters of one fused BFL linear, in row order: one kohya module. `Adapter` is
// LoraAdapter (import writes into them) or const LoraAdapter (export reads them).
template <class Adapter>
struct KohyaGroup {
  std::string name;
  int64_t out = 0;             // the linear's output features
  std::vector<Adapter*> ads;   // sorted by out_begin
};

template <class Adapter, class Adapters>
std::vector<KohyaGroup<Adapter>> kohya_groups(const FluxConfig& cfg, Adapters& all) {
  std::map<std::pair<int, std::string>, KohyaGroup<Adapter>> by;
  std::vector<std::pair<int, std::string>> order;  // first appearance: a stable key order
  for (Adapter& a : all) {
    if (a.cond >= 0) throw Error(kConditionOnly);
    const auto k = std::make_pair(a.block, a.linear);
    auto it = by.find(k);
    if (it == by.end()) {
      KohyaGroup<Adapter> g;
      g.name = kohya_module_name(cfg, a.block, a.linear);
      g.out = bfl_linear_out_features(cfg, a.linear);
      it = by.emplace(k, std::move(g)).first;
      order.push_back(k);
    }
    it->second.ads.push_back(&a);
  }
  std::vector<KohyaGroup<Adapter>> out;
  for (const auto& k : order) {
    KohyaGroup<Adapter> g = by.at(k);
    std::sort(g.ads.begin(), g.ads.end(), [](const Adapter* x, const Adapter* y) { return x->out_begin < y->out_begin; });
    for (const Adapter* a : g.ads)
      if (a->scale != g.ads[0]->scale)
        throw Error("the kohya format has one alpha per module; the adapters of " + g.name + " differ in alpha/rank");
    out.push_back(std::move(g));
  }
  return out;
}

template <class Adapter>
int64_t total_rank(const KohyaGroup<Adapter>& g) {
  int64_t r = 0;
  for (const LoraAdapter* a : g.ads) r += a->down.size(0);
  return r;
}

TensorMap export_kohya(const FluxConfig& cfg, const LoraSet& set) {
  TensorMap m;
  for (const auto& g : kohya_groups<const LoraAdapter>(cfg, set.adapters())) {
    const at::Tensor d0 = g.ads[0]->down.detach();
    const int64_t R = total_rank(g);
    std::vector<at::Tensor> downs;
    at::Tensor up = at::zeros({g.out, R}, d0.options());
    int64_t col = 0;
    for (const LoraAdapter* a : g.ads) {
      downs.push_back(a->down.detach());
      const int64_t r = a->down.size(0);
      up.narrow(0, a->out_begin, a->out_end - a->out_begin).narrow(1, col, r).copy_(a->up.detach());
      col += r;
    }
    m.emplace(g.name + ".lora_down.weight", at::cat(downs, 0));
    m.emplace(g.name + ".lora_up.weight", up);
    // Readers (diffusers, ComfyUI, sd-scripts without split_qkv) scale by alpha / rows of down.
    m.emplace(g.name + ".alpha", at::scalar_tensor(g.ads[0]->scale * static_cast<double>(R), at::kFloat));
  }
  return m;
}

[[noreturn]] void shape_error(const std::string& file, const std::string& key, at::IntArrayRef want, at::IntArrayRef got) {
  std::ostringstream ss;
  ss << file << ": LoRA key " << key << ": expected shape " << want << ", found " << got;
  throw Error(ss.str());
}

const at::Tensor& need(const TensorMap& t, const std::string& key, const std::string& file, std::set<std::string>& used) {
  auto it = t.find(key);
  if (it == t.end()) throw Error(file + ": missing LoRA key " + key);
  used.insert(key);
  return it->second;
}

void import_kohya(const FluxConfig& cfg, LoraSet& set, const TensorMap& tensors, const std::string& file,
                  std::set<std::string>& used) {
  at::NoGradGuard ng;
  for (const auto& g : kohya_groups<LoraAdapter>(cfg, set.adapters())) {
    const at::Tensor& down = need(tensors, g.name + ".lora_down.weight", file, used);
    const at::Tensor& up = need(tensors, g.name + ".lora_up.weight", file, used);
    const int64_t in = g.ads[0]->down.size(1), r0 = g.ads[0]->down.size(0), R = total_rank(g);
    bool dense = true;  // one down of each adapter's rank shared by every slice
    for (const LoraAdapter* a : g.ads) dense = dense && a->down.size(0) == r0;
    const int64_t rows = down.dim() == 2 ? down.size(0) : -1;
    const bool stacked = rows == R;
    if (!stacked && !(dense && rows == r0)) shape_error(file, g.name + ".lora_down.weight", {R, in}, down.sizes());
    if (down.size(1) != in) shape_error(file, g.name + ".lora_down.weight", {rows, in}, down.sizes());
    if (up.dim() != 2 || up.size(0) != g.out || up.size(1) != rows)
      shape_error(file, g.name + ".lora_up.weight", {g.out, rows}, up.sizes());
    auto al = tensors.find(g.name + ".alpha");
    if (al != tensors.end()) {
      used.insert(al->first);
      const double scale = al->second.item<double>() / static_cast<double>(rows);
      if (std::abs(scale - g.ads[0]->scale) > 1e-6 * std::abs(g.ads[0]->scale))
        throw Error(file + ": " + g.name + ".alpha gives scale " + std::to_string(scale) + " but the LoRA's alpha/rank is " +
                    std::to_string(g.ads[0]->scale));
    }
    // Every up entry outside the adapters' blocks must be zero, else the file holds a LoRA these
    // adapters cannot represent (and copying would silently drop part of it).
    at::Tensor rest = up.to(at::kDouble).clone();
    int64_t col = 0;
    for (LoraAdapter* a : g.ads) {
      const int64_t r = a->down.size(0), n = a->out_end - a->out_begin;
      const int64_t c = stacked ? col : 0;
      a->down.copy_(down.narrow(0, c, r));
      a->up.copy_(up.narrow(0, a->out_begin, n).narrow(1, c, r));
      rest.narrow(0, a->out_begin, n).narrow(1, c, r).zero_();
      col += r;
    }
    if (rest.numel() > 0 && rest.abs().max().item<double>() != 0)
      throw Error(file + ": " + g.name + ".lora_up.weight has entries outside the adapters' blocks (rows of targets "
                  "this LoRA does not have, or a stacked up that is not block-diagonal over q, k, v, ...)");
  }
}

}  // namespace

std::string kohya_module_name(const FluxConfig& cfg, int block, const std::string& linear) {
  const bool dbl = block < cfg.depth;
  const std::string head = dbl ? "double_blocks." + std::to_string(block)
                               : "single_blocks." + std::to_string(block - cfg.depth);
  return "lora_unet_" + dots_to_underscores(head + "." + linear);
}

int64_t bfl_linear_out_features(const FluxConfig& cfg, const std::string& linear) {
  const int64_t H = cfg.hidden_size, M = cfg.mlp_hidden();
  if (linear == "img_attn.qkv" || linear == "txt_attn.qkv") return 3 * H;
  if (linear == "img_attn.proj" || linear == "txt_attn.proj" || linear == "img_mlp.2" || linear == "txt_mlp.2" ||
      linear == "linear2")
    return H;
  if (linear == "img_mlp.0" || linear == "txt_mlp.0") return M;
  if (linear == "linear1") return 3 * H + M;
  throw Error("no kohya module for the BFL linear '" + linear + "'");
}

std::string lora_key_stem(const FluxConfig& cfg, const LoraAdapter& a, LoraFormat f) {
  if (f == LoraFormat::EasyControl) {
    const std::string m = easycontrol_module(a.target);
    if (a.cond < 0 || m.empty())
      throw Error("the EasyControl LoRA format holds only condition adapters on q, k, v and the double blocks' "
                  "output projection; " + a.target + " on every token is not one of them (use diffusers or kohya)");
    const bool dbl = a.block < cfg.depth;
    const std::string head = dbl ? "transformer_blocks." + std::to_string(a.block)
                                 : "single_transformer_blocks." + std::to_string(a.block - cfg.depth);
    return head + ".attn.processor." + m + "." + std::to_string(a.cond);
  }
  if (a.cond >= 0) throw Error(kConditionOnly);
  if (f == LoraFormat::Kohya) return kohya_module_name(cfg, a.block, a.linear);
  return "transformer." + diffusers_path(cfg, a.block, a.target);
}

std::string lora_down_suffix(LoraFormat f) {
  return f == LoraFormat::EasyControl ? ".down.weight" : f == LoraFormat::Kohya ? ".lora_down.weight" : ".lora_A.weight";
}
std::string lora_up_suffix(LoraFormat f) {
  return f == LoraFormat::EasyControl ? ".up.weight" : f == LoraFormat::Kohya ? ".lora_up.weight" : ".lora_B.weight";
}

LoraFormat detect_lora_format(const std::vector<std::string>& keys, const std::string& file) {
  auto ends = [](const std::string& s, const std::string& t) {
    return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
  };
  for (const auto& k : keys) {
    if (k.rfind("lora_unet_", 0) == 0 && ends(k, ".lora_down.weight")) return LoraFormat::Kohya;
    if (k.rfind("transformer.", 0) == 0 && ends(k, ".lora_A.weight")) return LoraFormat::Diffusers;
    if (k.find(".attn.processor.") != std::string::npos && ends(k, ".down.weight")) return LoraFormat::EasyControl;
  }
  throw Error(file + ": not a FLUX LoRA file fluxtrain knows (no lora_unet_*.lora_down.weight, "
                     "transformer.*.lora_A.weight or *.attn.processor.*_loras.*.down.weight keys)");
}

TensorMap export_lora(const FluxConfig& cfg, const LoraSet& set, LoraFormat f) {
  if (f == LoraFormat::Kohya) return export_kohya(cfg, set);
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
  if (f == LoraFormat::Kohya) {
    import_kohya(cfg, set, tensors, file, used);
  } else {
    for (auto& a : set.adapters()) {
      const std::string stem = lora_key_stem(cfg, a, f);
      for (int which = 0; which < 2; ++which) {
        const std::string key = stem + (which == 0 ? lora_down_suffix(f) : lora_up_suffix(f));
        at::Tensor& dst = which == 0 ? a.down : a.up;
        const at::Tensor& src = need(tensors, key, file, used);
        if (src.sizes() != dst.sizes()) shape_error(file, key, dst.sizes(), src.sizes());
        at::NoGradGuard ng;
        dst.copy_(src);
      }
    }
  }
  for (const auto& kv : tensors)
    if (!used.count(kv.first)) throw Error(file + ": unexpected LoRA key " + kv.first);
}

}  // namespace fluxtrain
