#include "model/lora_io.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <regex>
#include <set>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"

namespace fluxtrain {

LoraFormat native_lora_format(const LoraConfig& c) {
  return c.mode == LoraMode::EasyControl ? LoraFormat::EasyControl : LoraFormat::Diffusers;
}

std::string lora_file_name(LoraFormat format, LoraFormat native) {
  return format == native ? "lora.safetensors" : "lora_" + lora_format_name(format) + ".safetensors";
}

void save_lora_file(const std::string& path, const LoraSet& lora, LoraFormat format, const TensorMap& extra,
                    const std::string& extra_adapter_metadata) {
  const LoraConfig& c = lora.config();
  nlohmann::json meta = {{"mode", lora_mode_name(c.mode)},
                         {"lora_num", c.lora_num},
                         {"ranks", c.ranks},
                         {"network_alphas", c.alphas},
                         {"targets", c.targets},
                         {"blocks", c.blocks},
                         {"format", lora_format_name(format)}};
  TensorMap t;
  for (const auto& kv : export_lora(lora.model_config(), lora, format)) t.emplace(kv.first, kv.second.to(at::kFloat).contiguous());
  for (const auto& kv : extra) t.emplace(kv.first, kv.second.to(at::kFloat).contiguous());
  std::map<std::string, std::string> md{{"format", "pt"}, {"fluxtrain_lora", meta.dump()}};
  if (format == LoraFormat::Diffusers) {
    // peft's LoraConfig fields under "transformer.", as diffusers' save_lora_weights packs them.
    // Exact module paths: a bare "proj_out" would also match the transformer's final projection.
    std::vector<std::string> modules;
    for (const auto& a : lora.adapters()) {
      std::string stem = lora_key_stem(lora.model_config(), a, format);
      modules.push_back(stem.substr(std::string("transformer.").size()));
    }
    nlohmann::json adapter = {{"transformer.r", c.ranks.at(0)},
                              {"transformer.lora_alpha", c.alphas.at(0)},
                              {"transformer.target_modules", modules}};
    if (!extra_adapter_metadata.empty()) adapter.update(nlohmann::json::parse(extra_adapter_metadata));
    md["lora_adapter_metadata"] = adapter.dump();
  }
  safetensors::save(path, t, md);
}

void save_lora_file(const std::string& path, const LoraSet& lora) {
  save_lora_file(path, lora, native_lora_format(lora.config()));
}

std::vector<std::string> save_lora_files(const std::string& dir, const LoraSet& lora,
                                         const std::vector<std::string>& formats, const TensorMap& kohya_extra) {
  const LoraFormat native = native_lora_format(lora.config());
  std::vector<LoraFormat> todo{native};
  for (const auto& name : formats) {
    const LoraFormat f = parse_lora_format(name, "--lora_format");
    if (std::find(todo.begin(), todo.end(), f) == todo.end()) todo.push_back(f);
  }
  std::vector<std::string> paths;
  for (LoraFormat f : todo) {
    paths.push_back(path_join(dir, lora_file_name(f, native)));
    save_lora_file(paths.back(), lora, f, f == LoraFormat::Kohya ? kohya_extra : TensorMap{});
  }
  return paths;
}

namespace {

bool is_text_encoder_key(const std::string& k) {
  return k.rfind("text_encoder", 0) == 0 || k.rfind("lora_te", 0) == 0;
}

// kohya module (BFL linear, '.' as '_') -> the diffusers targets it holds, in row order.
const std::map<std::string, std::vector<std::string>>& kohya_targets() {
  static const std::map<std::string, std::vector<std::string>> m = {
      {"img_attn_qkv", {"to_q", "to_k", "to_v"}},
      {"txt_attn_qkv", {"add_q_proj", "add_k_proj", "add_v_proj"}},
      {"img_attn_proj", {"to_out.0"}},
      {"txt_attn_proj", {"to_add_out"}},
      {"img_mlp_0", {"ff.net.0.proj"}},
      {"img_mlp_2", {"ff.net.2"}},
      {"txt_mlp_0", {"ff_context.net.0.proj"}},
      {"txt_mlp_2", {"ff_context.net.2"}},
      {"linear1", {"to_q", "to_k", "to_v", "proj_mlp"}},
      {"linear2", {"proj_out"}}};
  return m;
}

// What a foreign standard-mode file holds: targets, blocks, one rank, one alpha (or none).
struct Inferred {
  std::set<std::string> targets;
  std::set<int> blocks;
  int64_t rank = 0;
  double alpha = 0;  // 0: the file records none
};

void add_rank(Inferred& in, int64_t r, const std::string& path, const std::string& key) {
  if (in.rank == 0) in.rank = r;
  if (in.rank != r)
    throw Error(path + ": LoRA modules of different ranks (" + key + " has " + std::to_string(r) + ", others " +
                std::to_string(in.rank) + "); fluxtrain's standard LoRA has one rank");
}

Inferred infer_diffusers(const safetensors::File& f, const FluxConfig& cfg) {
  static const std::regex re(R"(^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.(attn\.)?(.+)\.lora_A\.weight$)");
  Inferred in;
  for (const auto& kv : f.entries()) {
    std::smatch m;
    if (!std::regex_match(kv.first, m, re)) continue;
    const int i = std::stoi(m[2]);
    in.blocks.insert(m[1] == "transformer_blocks" ? i : static_cast<int>(cfg.depth) + i);
    in.targets.insert(m[4]);
    add_rank(in, kv.second.shape.at(0), f.path(), kv.first);
  }
  auto md = f.metadata().find("lora_adapter_metadata");
  if (md != f.metadata().end()) {
    try {
      const auto j = nlohmann::json::parse(md->second);
      if (j.contains("transformer.lora_alpha")) in.alpha = j["transformer.lora_alpha"].get<double>();
    } catch (const nlohmann::json::exception& e) {
      throw Error(f.path() + ": bad lora_adapter_metadata (" + std::string(e.what()) + ")");
    }
  }
  return in;
}

Inferred infer_kohya(const safetensors::File& f, const FluxConfig& cfg) {
  static const std::regex re(R"(^lora_unet_(double|single)_blocks_(\d+)_(.+)\.lora_down\.weight$)");
  Inferred in;
  std::set<double> scales;
  std::vector<std::pair<int64_t, int64_t>> modules;  // (rows of down, targets stacked in it)
  for (const auto& kv : f.entries()) {
    if (is_text_encoder_key(kv.first) || kv.first.find(".lora_down.weight") == std::string::npos) continue;
    std::smatch m;
    auto t = kohya_targets().end();
    if (std::regex_match(kv.first, m, re)) t = kohya_targets().find(m[3].str());
    if (t == kohya_targets().end())
      throw Error(f.path() + ": kohya LoRA module " + kv.first + " is not one fluxtrain trains (q/k/v, proj, mlp, "
                  "linear1/linear2 of the blocks)");
    const int i = std::stoi(m[2]);
    in.blocks.insert(m[1] == "double" ? i : static_cast<int>(cfg.depth) + i);
    in.targets.insert(t->second.begin(), t->second.end());
    const int64_t r = kv.second.shape.at(0);
    modules.emplace_back(r, static_cast<int64_t>(t->second.size()));
    const std::string stem = kv.first.substr(0, kv.first.size() - std::string(".lora_down.weight").size());
    if (f.contains(stem + ".alpha")) scales.insert(f.load(stem + ".alpha").item<double>() / static_cast<double>(r));
  }
  // One adapter rank r for all: every module is either dense (rows = r, one down shared by its
  // slices) or stacked (rows = r x its slices, as fluxtrain and sd-scripts' split_qkv write).
  for (const auto& [rows, n] : modules) in.rank = in.rank == 0 ? rows : std::min(in.rank, rows);
  for (const auto& [rows, n] : modules)
    if (rows != in.rank && rows != in.rank * n)
      throw Error(f.path() + ": kohya modules of ranks " + std::to_string(rows) + " and " + std::to_string(in.rank) +
                  " do not share one adapter rank; fluxtrain's standard LoRA has one rank");
  // alpha is a float32 scalar per module: equal scales may differ in the last bits.
  if (!scales.empty() && *scales.rbegin() - *scales.begin() > 1e-6 * *scales.rbegin())
    throw Error(f.path() + ": kohya modules with different alpha/rank; fluxtrain's standard LoRA has one");
  if (!scales.empty()) in.alpha = *scales.begin() * static_cast<double>(in.rank);
  return in;
}

LoraConfig standard_config(const Inferred& in, const FluxConfig& cfg, const std::vector<double>& alphas,
                           const std::string& path) {
  if (in.rank == 0) throw Error(path + ": holds no transformer LoRA modules");
  LoraConfig lc;
  lc.mode = LoraMode::Standard;
  lc.ranks = {in.rank};
  if (in.alpha > 0) lc.alphas = {in.alpha};
  else if (!alphas.empty()) lc.alphas = {alphas.at(0)};
  else lc.alphas = {static_cast<double>(in.rank)};
  // Targets in the usual order (q, k, v, projections, MLPs), so that adapters come in the order a
  // run with these --lora_targets creates them; names fluxtrain does not know go last (and fail
  // in LoraSet::create with the flag's message).
  static const std::vector<std::string> order = {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                 "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                                                 "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"};
  for (const auto& t : order)
    if (in.targets.count(t)) lc.targets.push_back(t);
  for (const auto& t : in.targets)
    if (std::find(order.begin(), order.end(), t) == order.end()) lc.targets.push_back(t);
  if (static_cast<int64_t>(in.blocks.size()) != cfg.num_blocks()) lc.blocks.assign(in.blocks.begin(), in.blocks.end());
  return lc;
}

LoraConfig easycontrol_config(const safetensors::File& f, const std::vector<double>& alphas) {
  // EasyControl's own file: lora_num and ranks from the q_loras down weights of block 0.
  static const std::regex re(R"(^transformer_blocks\.0\.attn\.processor\.q_loras\.(\d+)\.down\.weight$)");
  std::map<int, int64_t> rank_of;
  for (const auto& kv : f.entries()) {
    std::smatch m;
    if (std::regex_match(kv.first, m, re)) rank_of[std::stoi(m[1])] = kv.second.shape.at(0);
  }
  if (rank_of.empty())
    throw Error(f.path() + ": an EasyControl LoRA file needs transformer_blocks.0.attn.processor.q_loras.N.down.weight");
  LoraConfig lc;
  lc.mode = LoraMode::EasyControl;
  lc.lora_num = static_cast<int>(rank_of.size());
  lc.ranks.clear();
  for (const auto& kv : rank_of) lc.ranks.push_back(kv.second);
  if (!alphas.empty()) {
    if (alphas.size() != lc.ranks.size())
      throw Error(f.path() + ": has " + std::to_string(lc.ranks.size()) + " conditions but --network_alphas gives " +
                  std::to_string(alphas.size()) + " values");
    lc.alphas = alphas;
  } else {
    lc.alphas.assign(lc.ranks.begin(), lc.ranks.end());
  }
  return lc;
}

std::vector<std::string> transformer_keys(const safetensors::File& f) {
  std::vector<std::string> keys;
  for (const auto& kv : f.entries())
    if (!is_text_encoder_key(kv.first)) keys.push_back(kv.first);
  return keys;
}

}  // namespace

LoraFormat lora_file_format(const std::string& path) {
  safetensors::File f(path);
  return detect_lora_format(transformer_keys(f), path);
}

LoraSet load_lora_file(const std::string& path, const FluxConfig& cfg, const std::vector<double>& alphas) {
  safetensors::File f(path);
  const LoraFormat format = detect_lora_format(transformer_keys(f), path);
  LoraConfig lc;
  auto md = f.metadata().find("fluxtrain_lora");
  if (md != f.metadata().end()) {
    try {
      auto j = nlohmann::json::parse(md->second);
      lc.mode = j.at("mode") == "standard" ? LoraMode::Standard : LoraMode::EasyControl;
      lc.lora_num = j.at("lora_num").get<int>();
      lc.ranks = j.at("ranks").get<std::vector<int64_t>>();
      lc.alphas = j.at("network_alphas").get<std::vector<double>>();
      lc.targets = j.value("targets", std::vector<std::string>{});
      lc.blocks = j.value("blocks", std::vector<int>{});
    } catch (const std::exception& e) {
      throw Error(path + ": bad fluxtrain_lora metadata (" + std::string(e.what()) + ")");
    }
  } else if (format == LoraFormat::EasyControl) {
    lc = easycontrol_config(f, alphas);
  } else {
    lc = standard_config(format == LoraFormat::Kohya ? infer_kohya(f, cfg) : infer_diffusers(f, cfg), cfg, alphas, path);
  }
  LoraSet set = LoraSet::create(cfg, lc, 0);
  TensorMap tensors;
  for (const auto& k : transformer_keys(f)) tensors.emplace(k, f.load(k));
  import_lora(cfg, set, tensors, format, path);
  return set;
}

}  // namespace fluxtrain
