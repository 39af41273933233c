// fluxtrain convert-lora: rewrites a LoRA file in another format (kohya/ComfyUI, diffusers/PEFT,
// easycontrol). The weights are read into fluxtrain's adapters and written out again, so the
// conversion is exact (bit-equal weights) and refuses what the target format cannot express:
// docs/lora-formats.md.
#include <iostream>
#include <map>
#include <regex>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/options.h"
#include "core/safetensors.h"
#include "model/flux_config.h"
#include "model/lora_io.h"

namespace fluxtrain {
namespace {

// The transformer's dimensions: a preset name, a diffusers config.json, or a snapshot folder
// holding transformer/config.json.
FluxConfig model_dims(const std::string& spec) {
  std::string file = spec;
  if (is_directory(spec)) file = path_join(path_join(spec, "transformer"), "config.json");
  if (!path_exists(file)) return FluxConfig::preset(spec);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(file));
  } catch (const nlohmann::json::exception& e) {
    throw Error(file + ": not JSON (" + std::string(e.what()) + ")");
  }
  return FluxConfig::from_diffusers_json(j, file);
}

// Text-encoder LoRA keys between kohya (lora_te1_ CLIP, lora_te3_ T5) and diffusers
// (text_encoder., text_encoder_2.) names, for the attention projections fluxtrain trains.
// The kohya names lose the module path's dots; the two patterns below put them back.
struct TextKey {
  bool t5 = false;
  std::string module;  // HF module path
  std::string what;    // "down", "up", "alpha"
};

bool parse_text_key(const std::string& k, TextKey* out) {
  static const std::regex kohya_clip(R"(^lora_te1_text_model_encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj\.(lora_down\.weight|lora_up\.weight|alpha)$)");
  static const std::regex kohya_t5(R"(^lora_te3_encoder_block_(\d+)_layer_0_SelfAttention_(q|k|v|o)\.(lora_down\.weight|lora_up\.weight|alpha)$)");
  static const std::regex diff(R"(^(text_encoder|text_encoder_2)\.(.+)\.lora_(A|B)\.weight$)");
  std::smatch m;
  auto what = [](const std::string& s) { return s == "alpha" ? "alpha" : s == "lora_down.weight" ? "down" : "up"; };
  if (std::regex_match(k, m, kohya_clip)) {
    *out = {false, "text_model.encoder.layers." + m[1].str() + ".self_attn." + m[2].str() + "_proj", what(m[3])};
    return true;
  }
  if (std::regex_match(k, m, kohya_t5)) {
    *out = {true, "encoder.block." + m[1].str() + ".layer.0.SelfAttention." + m[2].str(), what(m[3])};
    return true;
  }
  if (std::regex_match(k, m, diff)) {
    *out = {m[1] == "text_encoder_2", m[2], m[3] == "A" ? "down" : "up"};
    // CLIP as transformers 5 names it ("encoder.layers.N..."): transformers 4's path, which
    // kohya's names and FLUX's LoRA files use.
    if (!out->t5 && out->module.rfind("encoder.layers.", 0) == 0) out->module = "text_model." + out->module;
    return true;
  }
  return false;
}

std::string kohya_name(const TextKey& t) {
  std::string m = t.module;
  for (char& c : m)
    if (c == '.') c = '_';
  return (t.t5 ? "lora_te3_" : "lora_te1_") + m;
}

// The text-encoder tensors of `f` in the target format's names; `adapter_meta` receives the
// diffusers alpha fields when the target is diffusers.
TensorMap convert_text_keys(const safetensors::File& f, LoraFormat to, nlohmann::json& adapter_meta) {
  std::map<bool, double> alpha;  // per encoder (false: CLIP, true: T5)
  std::map<bool, int64_t> rank;
  TensorMap out;
  // diffusers keeps the alpha in its header: fluxtrain's text-encoder metadata or diffusers' own.
  for (const char* key : {"lora_adapter_metadata", "fluxtrain_text_encoder_lora"}) {
    auto it = f.metadata().find(key);
    if (it == f.metadata().end()) continue;
    try {
      const auto j = nlohmann::json::parse(it->second);
      if (j.contains("text_encoder.lora_alpha")) alpha[false] = j["text_encoder.lora_alpha"].get<double>();
      if (j.contains("text_encoder_2.lora_alpha")) alpha[true] = j["text_encoder_2.lora_alpha"].get<double>();
      if (j.contains("text_encoder") && j["text_encoder"].is_object()) alpha[false] = j["text_encoder"].at("alpha").get<double>();
      if (j.contains("text_encoder_2") && j["text_encoder_2"].is_object()) alpha[true] = j["text_encoder_2"].at("alpha").get<double>();
    } catch (const nlohmann::json::exception& e) {
      throw Error(f.path() + ": bad " + key + " (" + e.what() + ")");
    }
  }
  for (const auto& kv : f.entries()) {
    if (kv.first.rfind("lora_te", 0) != 0 && kv.first.rfind("text_encoder", 0) != 0) continue;
    TextKey t;
    if (!parse_text_key(kv.first, &t))
      throw Error(f.path() + ": '" + kv.first + "' is not a text-encoder LoRA key convert-lora knows "
                  "(CLIP/T5 attention projections)");
    at::Tensor v = f.load(kv.first);
    if (t.what == "alpha") {
      alpha[t.t5] = v.item<double>();
      continue;
    }
    if (t.what == "down") rank[t.t5] = v.size(0);
    if (to == LoraFormat::Kohya) {
      out[kohya_name(t) + (t.what == "down" ? ".lora_down.weight" : ".lora_up.weight")] = v;
    } else {
      out[std::string(t.t5 ? "text_encoder_2." : "text_encoder.") + t.module + (t.what == "down" ? ".lora_A.weight" : ".lora_B.weight")] = v;
    }
  }
  for (const auto& [t5, r] : rank) {
    const double a = alpha.count(t5) ? alpha[t5] : static_cast<double>(r);
    if (to == LoraFormat::Kohya) {
      for (auto& kv : TensorMap(out)) {
        const std::string pre = t5 ? "lora_te3_" : "lora_te1_";
        const std::string suf = ".lora_down.weight";
        if (kv.first.rfind(pre, 0) == 0 && kv.first.size() > suf.size() &&
            kv.first.compare(kv.first.size() - suf.size(), suf.size(), suf) == 0)
          out[kv.first.substr(0, kv.first.size() - suf.size()) + ".alpha"] = at::scalar_tensor(a, at::kFloat);
      }
    } else {
      const std::string p = t5 ? "text_encoder_2." : "text_encoder.";
      adapter_meta[p + "r"] = r;
      adapter_meta[p + "lora_alpha"] = a;
    }
  }
  return out;
}

}  // namespace

int cmd_convert_lora(int argc, char** argv) {
  std::string input, output, to, model = "flux-dev";
  std::vector<double> alphas;
  OptionSet s("convert-lora", "fluxtrain convert-lora: rewrite a LoRA file in another format (docs/lora-formats.md)");
  s.group("Convert")
      .add("input", &input, "LoRA .safetensors in any format fluxtrain reads (required)")
      .add("output", &output, "output .safetensors (required)")
      .add("to", &to, "target format: kohya (ComfyUI), diffusers (PEFT) or easycontrol (required)")
      .add("model", &model,
           "the transformer's dimensions: flux-dev, flux-schnell, tiny, a diffusers config.json or a snapshot folder")
      .add("network_alphas", &alphas, "alpha for an input file that records none (default: alpha = rank)");
  if (!s.parse(argc, argv, std::cout)) return 0;
  for (const auto& [flag, v] : {std::pair<const char*, std::string>{"--input", input}, {"--output", output}, {"--to", to}})
    if (v.empty()) throw Error(std::string(flag) + " is required");
  const LoraFormat format = parse_lora_format(to, "--to");
  check_output_file("--output", output, {{"--input", input}});
  nlohmann::json te_meta = nlohmann::json::object();
  TensorMap te;
  bool has_transformer = false;
  {
    safetensors::File f(input);
    te = convert_text_keys(f, format, te_meta);
    for (const auto& kv : f.entries())
      has_transformer = has_transformer || (kv.first.rfind("lora_te", 0) != 0 && kv.first.rfind("text_encoder", 0) != 0);
  }
  if (!te.empty() && format == LoraFormat::EasyControl)
    throw Error(input + ": holds text-encoder LoRA tensors, which the easycontrol format has no place for");
  size_t adapters = 0;
  if (has_transformer) {
    const LoraSet lora = load_lora_file(input, model_dims(model), alphas);
    save_lora_file(output, lora, format, te, te_meta.empty() ? "" : te_meta.dump());
    adapters = lora.adapters().size();
  } else {
    // A text-encoder LoRA alone: its tensors and, for diffusers, the alpha in the header.
    check_input(!te.empty(), input + ": holds no LoRA tensors");
    std::map<std::string, std::string> md{{"format", "pt"}};
    if (!te_meta.empty()) md["lora_adapter_metadata"] = te_meta.dump();
    safetensors::save(output, te, md);
  }
  std::cout << output << " (" << lora_format_name(format) << ", " << adapters << " transformer adapters"
            << (te.empty() ? "" : ", text-encoder LoRA") << ")\n";
  return 0;
}

}  // namespace fluxtrain
