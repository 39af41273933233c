#include "model/flux_weights.h"

#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <set>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/shape_str.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "model/block_weights.h"

namespace fluxtrain {
namespace {

using Shape = std::vector<int64_t>;

// One BFL tensor = the diffusers tensors `parts` concatenated along dim 0 (in order).
// swap_halves: diffusers stores the final adaLN as [scale, shift], BFL as [shift, scale].
struct KeyRule {
  std::string bfl;
  std::vector<std::string> parts;
  std::vector<int64_t> part_rows;  // rows of each part along dim 0
  bool swap_halves = false;
};

std::vector<KeyRule> key_rules(const FluxConfig& c) {
  const int64_t H = c.hidden_size, M = c.mlp_hidden();
  std::vector<KeyRule> r;
  auto one = [&](const std::string& bfl, const std::string& diff) {
    for (const char* s : {".weight", ".bias"}) r.push_back({bfl + s, {diff + s}, {}, false});
  };
  one("img_in", "x_embedder");
  one("txt_in", "context_embedder");
  one("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1");
  one("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2");
  one("vector_in.in_layer", "time_text_embed.text_embedder.linear_1");
  one("vector_in.out_layer", "time_text_embed.text_embedder.linear_2");
  if (c.guidance_embed) {
    one("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1");
    one("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2");
  }
  for (int64_t i = 0; i < c.depth; ++i) {
    const std::string b = "double_blocks." + std::to_string(i) + ".";
    const std::string d = "transformer_blocks." + std::to_string(i) + ".";
    one(b + "img_mod.lin", d + "norm1.linear");
    one(b + "txt_mod.lin", d + "norm1_context.linear");
    for (const char* s : {".weight", ".bias"}) {
      if (!c.qkv_bias && std::string(s) == ".bias") continue;  // as in flux_weight_shapes
      r.push_back({b + "img_attn.qkv" + s, {d + "attn.to_q" + s, d + "attn.to_k" + s, d + "attn.to_v" + s}, {H, H, H}});
      r.push_back({b + "txt_attn.qkv" + s,
                   {d + "attn.add_q_proj" + s, d + "attn.add_k_proj" + s, d + "attn.add_v_proj" + s}, {H, H, H}});
    }
    r.push_back({b + "img_attn.norm.query_norm.scale", {d + "attn.norm_q.weight"}, {}});
    r.push_back({b + "img_attn.norm.key_norm.scale", {d + "attn.norm_k.weight"}, {}});
    r.push_back({b + "txt_attn.norm.query_norm.scale", {d + "attn.norm_added_q.weight"}, {}});
    r.push_back({b + "txt_attn.norm.key_norm.scale", {d + "attn.norm_added_k.weight"}, {}});
    one(b + "img_attn.proj", d + "attn.to_out.0");
    one(b + "txt_attn.proj", d + "attn.to_add_out");
    one(b + "img_mlp.0", d + "ff.net.0.proj");
    one(b + "img_mlp.2", d + "ff.net.2");
    one(b + "txt_mlp.0", d + "ff_context.net.0.proj");
    one(b + "txt_mlp.2", d + "ff_context.net.2");
  }
  for (int64_t i = 0; i < c.depth_single; ++i) {
    const std::string b = "single_blocks." + std::to_string(i) + ".";
    const std::string d = "single_transformer_blocks." + std::to_string(i) + ".";
    for (const char* s : {".weight", ".bias"})
      r.push_back({b + "linear1" + s,
                   {d + "attn.to_q" + s, d + "attn.to_k" + s, d + "attn.to_v" + s, d + "proj_mlp" + s},
                   {H, H, H, M}});
    one(b + "linear2", d + "proj_out");
    r.push_back({b + "norm.query_norm.scale", {d + "attn.norm_q.weight"}, {}});
    r.push_back({b + "norm.key_norm.scale", {d + "attn.norm_k.weight"}, {}});
    one(b + "modulation.lin", d + "norm.linear");
  }
  one("final_layer.linear", "proj_out");
  for (const char* s : {".weight", ".bias"})
    r.push_back({std::string("final_layer.adaLN_modulation.1") + s, {std::string("norm_out.linear") + s}, {}, true});
  return r;
}

at::Tensor swap_halves(const at::Tensor& t) {
  auto halves = t.chunk(2, 0);
  return at::cat({halves[1], halves[0]}, 0);
}

// Names and shapes only: what every strict check needs, whether the tensors are in memory or
// still in a file (then the shapes come from the safetensors header, no data is read).
using ShapeMap = std::map<std::string, Shape>;

ShapeMap shapes_of(const TensorMap& w) {
  ShapeMap s;
  for (const auto& kv : w) s.emplace(kv.first, kv.second.sizes().vec());
  return s;
}

// BFL layout: every tensor is stored under its own name, so its rule is the identity.
std::vector<KeyRule> identity_rules(const FluxConfig& c) {
  std::vector<KeyRule> r;
  for (const auto& [name, shape] : flux_weight_shapes(c)) r.push_back({name, {name}, {}, false});
  return r;
}

// Block index (BlockWeights numbering) of a BFL key, -1 for the globals. The keys come from
// our own rule lists, so they are well formed.
int block_of(const std::string& bfl, int64_t depth) {
  for (const char* kind : {"double_blocks.", "single_blocks."}) {
    const std::string p(kind);
    if (bfl.compare(0, p.size(), p) != 0) continue;
    const int idx = std::stoi(bfl.substr(p.size()));
    return p[0] == 'd' ? idx : static_cast<int>(depth) + idx;
  }
  return -1;
}

// BFL layout: every expected key present with its shape, nothing unexpected. Expected keys are
// checked in flux_weight_shapes order, so the first problem reported is always the same one.
void check_bfl_shapes(const FluxConfig& cfg, const ShapeMap& stored, const std::string& file) {
  std::set<std::string> expected;
  for (const auto& [name, shape] : flux_weight_shapes(cfg)) {
    expected.insert(name);
    auto it = stored.find(name);
    if (it == stored.end()) throw Error(file + ": missing key " + name + " (expected shape " + shape_str(shape) + ")");
    if (it->second != shape)
      throw Error(file + ": key " + name + ": expected shape " + shape_str(shape) + ", found " +
                  shape_str(it->second));
  }
  for (const auto& kv : stored)
    if (!expected.count(kv.first)) throw Error(file + ": unexpected key " + kv.first);
}

// Diffusers layout: every part of every rule present, each with the shape of its slice of the
// fused BFL tensor (the error names the diffusers key), nothing unexpected; in key_rules order.
void check_diffusers_shapes(const FluxConfig& cfg, const ShapeMap& stored, const std::string& file) {
  const auto shapes = flux_weight_shapes(cfg);
  const std::map<std::string, Shape> expected(shapes.begin(), shapes.end());
  std::set<std::string> used;
  for (const auto& rule : key_rules(cfg)) {
    for (size_t i = 0; i < rule.parts.size(); ++i) {
      const auto& key = rule.parts[i];
      auto it = stored.find(key);
      if (it == stored.end()) throw Error(file + ": missing key " + key);
      Shape want = expected.at(rule.bfl);
      if (!rule.part_rows.empty()) want[0] = rule.part_rows[i];
      if (it->second != want)
        throw Error(file + ": key " + key + ": expected shape " + shape_str(want) + ", found " +
                    shape_str(it->second));
      used.insert(key);
    }
  }
  for (const auto& kv : stored)
    if (!used.count(kv.first)) throw Error(file + ": unexpected key " + kv.first);
}

// One BFL tensor from its stored parts. Every conversion (whole model in memory, one block
// read from files, either layout) goes through here, so they cannot drift apart.
at::Tensor assemble(const KeyRule& rule, const std::function<at::Tensor(const std::string&)>& fetch) {
  std::vector<at::Tensor> parts;
  for (const auto& key : rule.parts) parts.push_back(fetch(key));
  at::Tensor t = parts.size() == 1 ? parts[0] : at::cat(parts, 0);
  return rule.swap_halves ? swap_halves(t) : t;
}

}  // namespace


std::vector<std::pair<std::string, Shape>> flux_weight_shapes(const FluxConfig& c) {
  const int64_t H = c.hidden_size, M = c.mlp_hidden(), D = c.head_dim();
  std::vector<std::pair<std::string, Shape>> s;
  auto lin = [&](const std::string& name, int64_t out, int64_t in, bool bias = true) {
    s.push_back({name + ".weight", {out, in}});
    if (bias) s.push_back({name + ".bias", {out}});
  };
  lin("img_in", H, c.in_channels);
  lin("time_in.in_layer", H, 256);
  lin("time_in.out_layer", H, H);
  lin("vector_in.in_layer", H, c.vec_in_dim);
  lin("vector_in.out_layer", H, H);
  if (c.guidance_embed) {
    lin("guidance_in.in_layer", H, 256);
    lin("guidance_in.out_layer", H, H);
  }
  lin("txt_in", H, c.context_in_dim);
  for (int64_t i = 0; i < c.depth; ++i) {
    const std::string b = "double_blocks." + std::to_string(i) + ".";
    for (const char* st : {"img", "txt"}) {
      const std::string p = b + st;
      lin(p + "_mod.lin", 6 * H, H);
      lin(p + "_attn.qkv", 3 * H, H, c.qkv_bias);
      s.push_back({p + "_attn.norm.query_norm.scale", {D}});
      s.push_back({p + "_attn.norm.key_norm.scale", {D}});
      lin(p + "_attn.proj", H, H);
      lin(p + "_mlp.0", M, H);
      lin(p + "_mlp.2", H, M);
    }
  }
  for (int64_t i = 0; i < c.depth_single; ++i) {
    const std::string b = "single_blocks." + std::to_string(i) + ".";
    lin(b + "linear1", 3 * H + M, H);
    lin(b + "linear2", H, H + M);
    s.push_back({b + "norm.query_norm.scale", {D}});
    s.push_back({b + "norm.key_norm.scale", {D}});
    lin(b + "modulation.lin", 3 * H, H);
  }
  lin("final_layer.linear", c.out_channels, H);
  lin("final_layer.adaLN_modulation.1", 2 * H, H);
  return s;
}

namespace {

// One random weight, drawn by the rules init_random_weights documents.
at::Tensor random_weight(const std::string& name, const std::vector<int64_t>& shape,
                         const std::optional<at::Generator>& gen, const at::TensorOptions& fopts,
                         at::ScalarType dtype) {
  at::Tensor t;
  const bool is_scale = name.size() > 6 && name.compare(name.size() - 6, 6, ".scale") == 0;
  const bool is_bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
  if (is_scale) {
    t = at::normal(1.0, 0.1, shape, gen, fopts);
  } else if (is_bias) {
    t = at::normal(0.0, 0.02, shape, gen, fopts);
  } else {
    // 1/sqrt(fan_in) keeps each linear's output at the input's scale; modulation linears
    // get a smaller scale so that gates and shifts stay moderate, as in trained FLUX.
    const bool is_mod = name.find("_mod.") != std::string::npos || name.find("modulation") != std::string::npos;
    const double std = (is_mod ? 0.3 : 1.0) / std::sqrt(static_cast<double>(shape[1]));
    t = at::normal(0.0, std, shape, gen, fopts);
  }
  return t.to(dtype);
}

}  // namespace

std::vector<std::pair<std::string, std::vector<int64_t>>> flux_block_shapes(const FluxConfig& cfg, int block) {
  const std::string prefix = block_prefix(block, cfg.depth);
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  for (const auto& [name, shape] : flux_weight_shapes(cfg))
    if (name.compare(0, prefix.size(), prefix) == 0) out.emplace_back(name.substr(prefix.size()), shape);
  return out;
}

TensorMap init_random_weights(const FluxConfig& cfg, uint64_t seed, at::ScalarType dtype, c10::Device device) {
  std::optional<at::Generator> gen;
  if (device.is_cpu()) {
    gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  } else {
    at::manual_seed(seed);  // the device's default generator
  }
  const auto fopts = at::TensorOptions().dtype(at::kFloat).device(device);
  TensorMap w;
  for (const auto& [name, shape] : flux_weight_shapes(cfg)) w.emplace(name, random_weight(name, shape, gen, fopts, dtype));
  return w;
}

TensorMap init_random_global_weights(const FluxConfig& cfg, uint64_t seed, at::ScalarType dtype) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto fopts = at::TensorOptions().dtype(at::kFloat);
  TensorMap w;
  for (const auto& [name, shape] : flux_weight_shapes(cfg))
    if (block_of(name, cfg.depth) < 0) w.emplace(name, random_weight(name, shape, std::optional<at::Generator>(gen), fopts, dtype));
  return w;
}

TensorMap init_random_block_weights(const FluxConfig& cfg, uint64_t seed, int block, at::ScalarType dtype) {
  if (block < 0 || block >= cfg.depth + cfg.depth_single)
    throw Error("random block weights: block " + std::to_string(block) + " is outside the model's " +
                    std::to_string(cfg.depth) + "+" + std::to_string(cfg.depth_single) + " blocks",
                ErrorKind::Internal);
  // Its own stream per block (splitmix64 of seed and block), so that any block can be drawn alone.
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(block) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(z ^ (z >> 31));
  const auto fopts = at::TensorOptions().dtype(at::kFloat);
  TensorMap w;
  for (const auto& [name, shape] : flux_block_shapes(cfg, block))
    w.emplace(name, random_weight(name, shape, std::optional<at::Generator>(gen), fopts, dtype));
  return w;
}

void check_weights(const FluxConfig& cfg, const TensorMap& w, const std::string& file) {
  check_bfl_shapes(cfg, shapes_of(w), file);
}

TensorMap bfl_to_diffusers(const FluxConfig& cfg, const TensorMap& bfl) {
  TensorMap out;
  for (const auto& rule : key_rules(cfg)) {
    auto it = bfl.find(rule.bfl);
    if (it == bfl.end()) throw Error("converting to diffusers: missing key " + rule.bfl);
    at::Tensor t = rule.swap_halves ? swap_halves(it->second) : it->second;
    if (rule.parts.size() == 1) {
      out.emplace(rule.parts[0], t);
    } else {
      auto pieces = t.split_with_sizes(rule.part_rows, 0);
      for (size_t i = 0; i < pieces.size(); ++i) out.emplace(rule.parts[i], pieces[i].contiguous());
    }
  }
  return out;
}

TensorMap diffusers_to_bfl(const FluxConfig& cfg, const TensorMap& diff, const std::string& file) {
  check_diffusers_shapes(cfg, shapes_of(diff), file);
  TensorMap out;
  for (const auto& rule : key_rules(cfg))
    out.emplace(rule.bfl, assemble(rule, [&](const std::string& key) { return diff.at(key); }));
  return out;
}

// The open files and, per part of the model, the rules that build its BFL tensors.
struct TransformerSource::Impl {
  FluxConfig config;
  std::string source, layout;
  at::ScalarType dtype = at::ScalarType::Undefined;
  std::vector<std::unique_ptr<safetensors::File>> files;
  std::map<std::string, const safetensors::File*> where;  // stored name -> file holding it
  std::vector<std::vector<KeyRule>> parts;                // [0]: globals, [1 + i]: block i

  // Checks the names and shapes of everything stored (headers only) against the layout, then
  // sorts the layout's rules into the parts that read them.
  void finish(const ShapeMap& stored, std::vector<KeyRule> rules) {
    if (layout == "bfl")
      check_bfl_shapes(config, stored, source);
    else
      check_diffusers_shapes(config, stored, source);
    parts.assign(static_cast<size_t>(1 + config.num_blocks()), {});
    for (auto& rule : rules) {
      const int b = block_of(rule.bfl, config.depth);
      parts.at(static_cast<size_t>(1 + b)).push_back(std::move(rule));
    }
  }

  // Part p's tensors, named by their BFL key with `prefix` removed (relative names in blocks).
  TensorMap read_part(size_t p, const std::string& prefix) const {
    auto fetch = [&](const std::string& key) {
      at::Tensor t = where.at(key)->load(key);  // a copy out of the mapping
      return dtype == at::ScalarType::Undefined ? t : t.to(dtype);
    };
    TensorMap out;
    for (const auto& rule : parts.at(p)) out.emplace(rule.bfl.substr(prefix.size()), assemble(rule, fetch));
    return out;
  }
};

TransformerSource::TransformerSource() = default;

int TransformerSource::num_blocks() const { return impl_ ? static_cast<int>(impl_->parts.size()) - 1 : 0; }

TensorMap TransformerSource::globals() const {
  check_input(impl_ != nullptr, "transformer source: not opened");
  return impl_->read_part(0, "");
}

TensorMap TransformerSource::block(int i) const {
  check_input(impl_ != nullptr, "transformer source: not opened");
  check_input(i >= 0 && i < num_blocks(), source + ": block " + std::to_string(i) + " does not exist (the model has " +
                                              std::to_string(num_blocks()) + " blocks)");
  return impl_->read_part(static_cast<size_t>(1 + i), block_prefix(i, impl_->config.depth));
}

TensorMap TransformerSource::load_all() const {
  TensorMap out = globals();
  for (int i = 0; i < num_blocks(); ++i) {
    const std::string prefix = block_prefix(i, impl_->config.depth);
    for (auto& kv : block(i)) out.emplace(prefix + kv.first, std::move(kv.second));
  }
  return out;
}

namespace {

FluxConfig infer_config_from_bfl(const safetensors::File& f) {
  // The file's own metadata wins (files fluxtrain writes carry it); else infer from shapes.
  auto md = f.metadata().find("fluxtrain_config");
  if (md != f.metadata().end())
    return FluxConfig::from_diffusers_json(nlohmann::json::parse(md->second), f.path() + " (metadata)");
  auto shape = [&](const std::string& key) -> const std::vector<int64_t>& {
    auto it = f.entries().find(key);
    if (it == f.entries().end())
      throw Error(f.path() + ": missing key " + key + " (not a FLUX transformer in BFL layout?)");
    return it->second.shape;
  };
  FluxConfig c;
  c.hidden_size = shape("img_in.weight").at(0);
  c.in_channels = shape("img_in.weight").at(1);
  c.out_channels = shape("final_layer.linear.weight").at(0);
  c.context_in_dim = shape("txt_in.weight").at(1);
  c.vec_in_dim = shape("vector_in.in_layer.weight").at(1);
  c.guidance_embed = f.contains("guidance_in.in_layer.weight");
  const int64_t head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale").at(0);
  c.num_heads = c.hidden_size / head_dim;
  c.mlp_ratio = static_cast<double>(shape("double_blocks.0.img_mlp.0.weight").at(0)) / c.hidden_size;
  c.depth = c.depth_single = 0;
  while (f.contains("double_blocks." + std::to_string(c.depth) + ".img_attn.qkv.weight")) ++c.depth;
  while (f.contains("single_blocks." + std::to_string(c.depth_single) + ".linear1.weight")) ++c.depth_single;
  // BFL files carry no rope axes: FLUX uses (16, 56, 56) for head dim 128; otherwise the
  // first axis gets head_dim/8 and the two spatial axes share the rest.
  int64_t a0 = head_dim / 8, rest = (head_dim - a0) / 2;
  c.axes_dim = {a0, rest, head_dim - a0 - rest};
  c.validate(f.path() + " (inferred config; add transformer/config.json to set it)");
  return c;
}

using ImplPtr = std::shared_ptr<TransformerSource::Impl>;

ImplPtr open_bfl_file(const std::string& file, const FluxConfig* cfg_hint, at::ScalarType dtype) {
  auto impl = std::make_shared<TransformerSource::Impl>();
  impl->files.push_back(std::make_unique<safetensors::File>(file));
  const safetensors::File& f = *impl->files.back();
  impl->config = cfg_hint ? *cfg_hint : infer_config_from_bfl(f);
  impl->source = file;
  impl->layout = "bfl";
  impl->dtype = dtype;
  ShapeMap stored;
  for (const auto& kv : f.entries()) {
    stored.emplace(kv.first, kv.second.shape);
    impl->where.emplace(kv.first, &f);
  }
  impl->finish(stored, identity_rules(impl->config));
  return impl;
}

ImplPtr open_diffusers_dir(const std::string& dir, at::ScalarType dtype) {
  const std::string config_file = path_join(dir, "config.json");
  if (!path_exists(config_file)) throw Error(dir + ": no config.json (not a diffusers transformer folder)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(config_file));
  } catch (const nlohmann::json::exception& e) {
    throw Error(config_file + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  auto impl = std::make_shared<TransformerSource::Impl>();
  impl->config = FluxConfig::from_diffusers_json(j, config_file);
  impl->source = dir;
  impl->layout = "diffusers";
  impl->dtype = dtype;
  std::vector<std::string> shards;
  const std::string index_file = path_join(dir, "diffusion_pytorch_model.safetensors.index.json");
  const std::string single_file = path_join(dir, "diffusion_pytorch_model.safetensors");
  std::map<std::string, std::string> key_to_shard;
  if (path_exists(index_file)) {
    nlohmann::json idx;
    try {
      idx = nlohmann::json::parse(read_text_file(index_file));
      for (auto it = idx.at("weight_map").begin(); it != idx.at("weight_map").end(); ++it)
        key_to_shard[it.key()] = it.value().get<std::string>();
    } catch (const nlohmann::json::exception& e) {
      throw Error(index_file + ": not a valid safetensors index (" + std::string(e.what()) + ")");
    }
    std::set<std::string> names;
    for (const auto& kv : key_to_shard) names.insert(kv.second);
    shards.assign(names.begin(), names.end());
  } else if (path_exists(single_file)) {
    shards.push_back("diffusion_pytorch_model.safetensors");
  } else {
    throw Error(dir + ": neither diffusion_pytorch_model.safetensors nor its .index.json");
  }
  ShapeMap stored;
  for (const auto& shard : shards) {
    const std::string path = path_join(dir, shard);
    if (!path_exists(path)) throw Error(index_file + ": shard " + shard + " is missing");
    impl->files.push_back(std::make_unique<safetensors::File>(path));
    const safetensors::File& f = *impl->files.back();
    for (const auto& kv : f.entries()) {
      if (!key_to_shard.empty()) {
        auto it = key_to_shard.find(kv.first);
        if (it == key_to_shard.end() || it->second != shard)
          throw Error(path + ": key " + kv.first + " is not listed for this shard in " + index_file);
      }
      stored.emplace(kv.first, kv.second.shape);
      impl->where.emplace(kv.first, &f);
    }
  }
  for (const auto& kv : key_to_shard)
    if (!stored.count(kv.first)) throw Error(index_file + ": key " + kv.first + " not found in " + kv.second);
  impl->finish(stored, key_rules(impl->config));
  return impl;
}

std::string find_bfl_file(const std::string& dir) {
  for (const char* name : {"flux1-dev.safetensors", "flux1-schnell.safetensors", "flux1.safetensors"}) {
    const std::string p = path_join(dir, name);
    if (path_exists(p)) return p;
  }
  return "";
}

ImplPtr open_any(const std::string& path, const std::string& layout, at::ScalarType dtype) {
  if (layout != "auto" && layout != "bfl" && layout != "diffusers")
    throw Error("--model_layout must be auto, bfl or diffusers, got '" + layout + "'");
  if (!path_exists(path)) throw Error(path + ": no such file or directory");
  if (!is_directory(path)) {
    if (layout == "diffusers") throw Error(path + ": a diffusers transformer is a folder, not a file");
    return open_bfl_file(path, nullptr, dtype);
  }
  const std::string tdir = path_join(path, "transformer");
  const bool has_tdir = path_exists(path_join(tdir, "config.json"));
  const bool is_tdir = path_exists(path_join(path, "config.json")) &&
                       (path_exists(path_join(path, "diffusion_pytorch_model.safetensors")) ||
                        path_exists(path_join(path, "diffusion_pytorch_model.safetensors.index.json")));
  const std::string bfl = find_bfl_file(path);
  if (layout != "diffusers" && !bfl.empty()) {
    // A snapshot holds both: the BFL file is one read; its config comes from transformer/config.json.
    if (has_tdir) {
      const std::string config_file = path_join(tdir, "config.json");
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(read_text_file(config_file));
      } catch (const nlohmann::json::exception& e) {
        throw Error(config_file + ": not valid JSON (" + std::string(e.what()) + ")");
      }
      FluxConfig cfg = FluxConfig::from_diffusers_json(j, config_file);
      return open_bfl_file(bfl, &cfg, dtype);
    }
    return open_bfl_file(bfl, nullptr, dtype);
  }
  if (layout != "bfl") {
    if (has_tdir) return open_diffusers_dir(tdir, dtype);
    if (is_tdir) return open_diffusers_dir(path, dtype);
  }
  throw Error(path + ": neither a BFL checkpoint (flux1-dev.safetensors / flux1-schnell.safetensors) nor a "
                     "diffusers transformer folder (transformer/config.json + diffusion_pytorch_model*.safetensors)");
}

}  // namespace

TransformerSource open_transformer(const std::string& path, const std::string& layout, at::ScalarType dtype) {
  TransformerSource s;
  try {
    ImplPtr impl = open_any(path, layout, dtype);
    s.config = impl->config;
    s.source = impl->source;
    s.layout = impl->layout;
    s.impl_ = std::move(impl);
  } catch (...) {
    rethrow_with_context("loading transformer");
  }
  return s;
}

LoadedTransformer load_transformer(const std::string& path, const std::string& layout, at::ScalarType dtype) {
  TransformerSource s = open_transformer(path, layout, dtype);
  return {s.config, s.load_all(), s.source, s.layout};
}

void save_bfl(const std::string& file, const FluxConfig& cfg, const TensorMap& bfl) {
  check_weights(cfg, bfl, file);
  safetensors::save(file, bfl, {{"fluxtrain_config", cfg.to_diffusers_json().dump()}, {"format", "pt"}});
}

void save_diffusers(const std::string& dir, const FluxConfig& cfg, const TensorMap& bfl, uint64_t max_shard_bytes) {
  check_weights(cfg, bfl, dir);
  make_directories(dir);
  TensorMap diff = bfl_to_diffusers(cfg, bfl);
  // Greedy sharding in key order, like diffusers' save_pretrained.
  std::vector<TensorMap> shards(1);
  uint64_t cur = 0, total = 0;
  for (const auto& kv : diff) {
    const uint64_t n = kv.second.numel() * kv.second.element_size();
    if (cur > 0 && cur + n > max_shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().emplace(kv.first, kv.second);
    cur += n;
    total += n;
  }
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[96];
    std::snprintf(name, sizeof(name), "diffusion_pytorch_model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    safetensors::save(path_join(dir, name), shards[i], {{"format", "pt"}});
    for (const auto& kv : shards[i]) weight_map[kv.first] = name;
  }
  nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  write_text_file_atomic(path_join(dir, "diffusion_pytorch_model.safetensors.index.json"), index.dump(2));
  write_text_file_atomic(path_join(dir, "config.json"), cfg.to_diffusers_json().dump(2));
}

}  // namespace fluxtrain
