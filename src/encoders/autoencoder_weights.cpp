#include "encoders/autoencoder_weights.h"

#include <cmath>
#include <map>
#include <set>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/shape_str.h"
#include "core/fs.h"
#include "core/rng.h"
#include "core/safetensors.h"

namespace fluxtrain {
namespace {

using Shape = std::vector<int64_t>;

std::string ends_with_any(const std::string& s, std::initializer_list<const char*> suffixes) {
  for (const char* x : suffixes) {
    const std::string suf(x);
    if (s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0) return suf;
  }
  return "";
}

// One BFL key and its diffusers name; `squeeze`: BFL stores a 1x1 conv [C,C,1,1], diffusers a
// linear [C,C] (the mid-block attention projections).
struct KeyRule {
  std::string bfl, diffusers;
  bool squeeze = false;
};

std::vector<KeyRule> key_rules(const AutoencoderConfig& c) {
  std::vector<KeyRule> r;
  auto both = [&](const std::string& bfl, const std::string& diff, bool squeeze = false) {
    r.push_back({bfl + ".weight", diff + ".weight", squeeze});
    r.push_back({bfl + ".bias", diff + ".bias", false});
  };
  const int64_t L = c.num_levels();
  auto resnet = [&](const std::string& bfl, const std::string& diff, bool shortcut) {
    for (const char* n : {"norm1", "conv1", "norm2", "conv2"}) both(bfl + "." + n, diff + "." + n);
    if (shortcut) both(bfl + ".nin_shortcut", diff + ".conv_shortcut");
  };
  auto mid = [&](const std::string& side) {
    resnet(side + ".mid.block_1", side + ".mid_block.resnets.0", false);
    const std::string a = side + ".mid.attn_1", d = side + ".mid_block.attentions.0";
    both(a + ".norm", d + ".group_norm");
    both(a + ".q", d + ".to_q", true);
    both(a + ".k", d + ".to_k", true);
    both(a + ".v", d + ".to_v", true);
    both(a + ".proj_out", d + ".to_out.0", true);
    resnet(side + ".mid.block_2", side + ".mid_block.resnets.1", false);
  };
  both("encoder.conv_in", "encoder.conv_in");
  int64_t in = c.block_out_channels[0];
  for (int64_t i = 0; i < L; ++i) {
    const int64_t out = c.block_out_channels[static_cast<size_t>(i)];
    for (int64_t j = 0; j < c.layers_per_block; ++j) {
      resnet("encoder.down." + std::to_string(i) + ".block." + std::to_string(j),
             "encoder.down_blocks." + std::to_string(i) + ".resnets." + std::to_string(j), in != out);
      in = out;
    }
    if (i != L - 1)
      both("encoder.down." + std::to_string(i) + ".downsample.conv",
           "encoder.down_blocks." + std::to_string(i) + ".downsamplers.0.conv");
  }
  mid("encoder");
  both("encoder.norm_out", "encoder.conv_norm_out");
  both("encoder.conv_out", "encoder.conv_out");
  both("decoder.conv_in", "decoder.conv_in");
  mid("decoder");
  in = c.block_out_channels.back();
  for (int64_t i = L - 1; i >= 0; --i) {
    const int64_t out = c.block_out_channels[static_cast<size_t>(i)];
    const std::string d = "decoder.up_blocks." + std::to_string(L - 1 - i);
    for (int64_t j = 0; j <= c.layers_per_block; ++j) {
      resnet("decoder.up." + std::to_string(i) + ".block." + std::to_string(j), d + ".resnets." + std::to_string(j),
             in != out);
      in = out;
    }
    if (i != 0) both("decoder.up." + std::to_string(i) + ".upsample.conv", d + ".upsamplers.0.conv");
  }
  both("decoder.norm_out", "decoder.conv_norm_out");
  both("decoder.conv_out", "decoder.conv_out");
  return r;
}

using ShapeMap = std::map<std::string, Shape>;

ShapeMap shapes_of(const TensorMap& w) {
  ShapeMap s;
  for (const auto& kv : w) s.emplace(kv.first, kv.second.sizes().vec());
  return s;
}

void check_shapes(const AutoencoderConfig& cfg, const ShapeMap& stored, const std::string& file, bool diffusers) {
  const auto shapes = autoencoder_weight_shapes(cfg);
  const std::map<std::string, Shape> expected(shapes.begin(), shapes.end());
  std::set<std::string> used;
  for (const auto& rule : key_rules(cfg)) {
    const std::string& key = diffusers ? rule.diffusers : rule.bfl;
    Shape want = expected.at(rule.bfl);
    if (diffusers && rule.squeeze) want.resize(2);
    auto it = stored.find(key);
    if (it == stored.end()) throw Error(file + ": missing key " + key + " (expected shape " + shape_str(want) + ")");
    if (it->second != want)
      throw Error(file + ": key " + key + ": expected shape " + shape_str(want) + ", found " + shape_str(it->second));
    used.insert(key);
  }
  for (const auto& kv : stored)
    if (!used.count(kv.first)) throw Error(file + ": unexpected key " + kv.first);
}

// BFL file without our metadata: the structure from the shapes; GroupNorm groups and the
// latent scaling are FLUX's.
AutoencoderConfig infer_bfl_config(const ShapeMap& s, const std::string& file) {
  auto get = [&](const std::string& k) -> const Shape& {
    auto it = s.find(k);
    if (it == s.end() || it->second.size() != 4)
      throw Error(file + ": missing key " + k + " (not a FLUX autoencoder file)");
    return it->second;
  };
  AutoencoderConfig c;
  c.in_channels = get("encoder.conv_in.weight")[1];
  c.out_channels = get("decoder.conv_out.weight")[0];
  c.latent_channels = get("decoder.conv_in.weight")[1];
  c.block_out_channels.clear();
  for (int i = 0; s.count("encoder.down." + std::to_string(i) + ".block.0.conv1.weight"); ++i)
    c.block_out_channels.push_back(get("encoder.down." + std::to_string(i) + ".block.0.conv1.weight")[0]);
  if (c.block_out_channels.empty()) throw Error(file + ": missing key encoder.down.0.block.0.conv1.weight");
  c.layers_per_block = 0;
  while (s.count("encoder.down.0.block." + std::to_string(c.layers_per_block) + ".conv1.weight")) ++c.layers_per_block;
  c.validate(file + " (config inferred from the shapes)");
  return c;
}

TensorMap cast_all(TensorMap w, at::ScalarType dtype) {
  if (dtype == at::ScalarType::Undefined) return w;
  for (auto& kv : w) kv.second = kv.second.to(dtype);
  return w;
}

LoadedAutoencoder load_bfl(const std::string& file, at::ScalarType dtype) {
  safetensors::File f(file);
  ShapeMap s;
  for (const auto& kv : f.entries()) s.emplace(kv.first, kv.second.shape);
  LoadedAutoencoder out;
  auto md = f.metadata().find("fluxtrain_vae_config");
  if (md != f.metadata().end()) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(md->second);
    } catch (const std::exception& e) {
      throw Error(file + ": metadata fluxtrain_vae_config is not JSON");
    }
    out.config = AutoencoderConfig::from_diffusers_json(j, file + " (metadata)");
  } else {
    out.config = infer_bfl_config(s, file);
  }
  check_shapes(out.config, s, file, false);
  out.weights = cast_all(f.load_all(), dtype);
  out.source = file;
  out.layout = "bfl";
  return out;
}

LoadedAutoencoder load_diffusers(const std::string& dir, at::ScalarType dtype) {
  const std::string config_file = path_join(dir, "config.json");
  if (!path_exists(config_file)) throw Error(dir + ": no config.json (not a diffusers vae folder)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(config_file));
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(config_file + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  LoadedAutoencoder out;
  out.config = AutoencoderConfig::from_diffusers_json(j, config_file);
  // One file (diffusers writes the VAE unsharded); an index with shards is read too.
  TensorMap diff;
  const std::string single = path_join(dir, "diffusion_pytorch_model.safetensors");
  const std::string index_file = single + ".index.json";
  std::string where = single;
  if (path_exists(single)) {
    diff = safetensors::load(single);
  } else if (path_exists(index_file)) {
    where = dir;
    nlohmann::json idx;
    try {
      idx = nlohmann::json::parse(read_text_file(index_file));
    } catch (const std::exception& e) {
      throw Error(index_file + ": not a valid safetensors index");
    }
    std::set<std::string> files;
    for (const auto& kv : idx.at("weight_map").items()) files.insert(kv.value().get<std::string>());
    for (const auto& name : files)
      for (auto& kv : safetensors::load(path_join(dir, name))) diff.emplace(kv.first, kv.second);
  } else {
    throw Error(dir + ": no diffusion_pytorch_model.safetensors");
  }
  out.weights = cast_all(autoencoder_diffusers_to_bfl(out.config, diff, where), dtype);
  out.source = dir;
  out.layout = "diffusers";
  return out;
}

}  // namespace

std::vector<std::pair<std::string, Shape>> autoencoder_weight_shapes(const AutoencoderConfig& c) {
  std::vector<std::pair<std::string, Shape>> s;
  auto conv = [&](const std::string& name, int64_t out, int64_t in, int64_t k) {
    s.push_back({name + ".weight", {out, in, k, k}});
    s.push_back({name + ".bias", {out}});
  };
  auto norm = [&](const std::string& name, int64_t ch) {
    s.push_back({name + ".weight", {ch}});
    s.push_back({name + ".bias", {ch}});
  };
  auto resnet = [&](const std::string& b, int64_t in, int64_t out) {
    norm(b + ".norm1", in);
    conv(b + ".conv1", out, in, 3);
    norm(b + ".norm2", out);
    conv(b + ".conv2", out, out, 3);
    if (in != out) conv(b + ".nin_shortcut", out, in, 1);
  };
  auto mid = [&](const std::string& side, int64_t ch) {
    resnet(side + ".mid.block_1", ch, ch);
    norm(side + ".mid.attn_1.norm", ch);
    for (const char* n : {"q", "k", "v", "proj_out"}) conv(side + ".mid.attn_1." + n, ch, ch, 1);
    resnet(side + ".mid.block_2", ch, ch);
  };
  const int64_t L = c.num_levels();
  const auto& w = c.block_out_channels;
  conv("encoder.conv_in", w[0], c.in_channels, 3);
  int64_t in = w[0];
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t j = 0; j < c.layers_per_block; ++j) {
      resnet("encoder.down." + std::to_string(i) + ".block." + std::to_string(j), in, w[static_cast<size_t>(i)]);
      in = w[static_cast<size_t>(i)];
    }
    if (i != L - 1) conv("encoder.down." + std::to_string(i) + ".downsample.conv", in, in, 3);
  }
  mid("encoder", in);
  norm("encoder.norm_out", in);
  conv("encoder.conv_out", 2 * c.latent_channels, in, 3);
  in = w.back();
  conv("decoder.conv_in", in, c.latent_channels, 3);
  mid("decoder", in);
  for (int64_t i = L - 1; i >= 0; --i) {
    for (int64_t j = 0; j <= c.layers_per_block; ++j) {
      resnet("decoder.up." + std::to_string(i) + ".block." + std::to_string(j), in, w[static_cast<size_t>(i)]);
      in = w[static_cast<size_t>(i)];
    }
    if (i != 0) conv("decoder.up." + std::to_string(i) + ".upsample.conv", in, in, 3);
  }
  norm("decoder.norm_out", in);
  conv("decoder.conv_out", c.out_channels, in, 3);
  return s;
}

void check_autoencoder_weights(const AutoencoderConfig& cfg, const TensorMap& w, const std::string& file) {
  check_shapes(cfg, shapes_of(w), file, false);
}

TensorMap init_random_autoencoder(const AutoencoderConfig& cfg, uint64_t seed, at::ScalarType dtype) {
  at::Generator gen = cpu_generator(seed);
  const auto fopts = at::TensorOptions().dtype(at::kFloat);
  TensorMap w;
  for (const auto& [name, shape] : autoencoder_weight_shapes(cfg)) {
    at::Tensor t;
    const bool is_norm = name.find("norm") != std::string::npos;
    const bool is_bias = !ends_with_any(name, {".bias"}).empty();
    if (is_norm && !is_bias) {
      t = at::normal(1.0, 0.1, shape, gen, fopts);
    } else if (is_bias) {
      t = at::normal(0.0, 0.02, shape, gen, fopts);
    } else {
      // 1/sqrt(fan_in) keeps each conv's output at its input's scale; the second conv of a
      // resnet and the attention output are damped so that residual sums stay O(1).
      const int64_t fan_in = shape[1] * shape[2] * shape[3];
      double std = 1.0 / std::sqrt(static_cast<double>(fan_in));
      if (!ends_with_any(name, {".conv2.weight", ".proj_out.weight"}).empty()) std *= 0.3;
      t = at::normal(0.0, std, shape, gen, fopts);
    }
    w.emplace(name, t.to(dtype));
  }
  return w;
}

TensorMap autoencoder_bfl_to_diffusers(const AutoencoderConfig& cfg, const TensorMap& bfl) {
  check_autoencoder_weights(cfg, bfl, "autoencoder");
  TensorMap out;
  for (const auto& r : key_rules(cfg)) {
    const at::Tensor& t = bfl.at(r.bfl);
    out.emplace(r.diffusers, r.squeeze ? t.flatten(1).contiguous() : t);
  }
  return out;
}

TensorMap autoencoder_diffusers_to_bfl(const AutoencoderConfig& cfg, const TensorMap& diff, const std::string& file) {
  check_shapes(cfg, shapes_of(diff), file, true);
  TensorMap out;
  for (const auto& r : key_rules(cfg)) {
    const at::Tensor& t = diff.at(r.diffusers);
    out.emplace(r.bfl, r.squeeze ? t.reshape({t.size(0), t.size(1), 1, 1}) : t);
  }
  return out;
}

bool has_autoencoder(const std::string& path) {
  if (!is_directory(path)) return path_exists(path) && file_extension(path) == ".safetensors";
  return path_exists(path_join(path, "ae.safetensors")) || path_exists(path_join(path, "config.json")) ||
         path_exists(path_join(path_join(path, "vae"), "config.json"));
}

LoadedAutoencoder load_autoencoder(const std::string& path, const std::string& layout, at::ScalarType dtype) {
  check_input(layout == "auto" || layout == "bfl" || layout == "diffusers",
              "autoencoder layout must be auto, bfl or diffusers, got '" + layout + "'");
  if (!path_exists(path)) throw Error(path + ": no such file or directory (expected ae.safetensors or a vae/ folder)");
  if (!is_directory(path)) {
    if (layout == "diffusers") throw Error(path + ": a file, but --vae_layout diffusers needs a vae/ folder");
    return load_bfl(path, dtype);
  }
  const std::string ae = path_join(path, "ae.safetensors");
  const std::string vae = path_join(path, "vae");
  const bool is_vae_folder = path_exists(path_join(path, "config.json")) &&
                             !path_exists(path_join(path, "model_index.json"));
  if (is_vae_folder && layout != "bfl") return load_diffusers(path, dtype);
  if (layout != "diffusers" && path_exists(ae)) return load_bfl(ae, dtype);
  if (layout != "bfl" && is_directory(vae)) return load_diffusers(vae, dtype);
  throw Error(path + ": no autoencoder found (expected " +
              (layout == "diffusers" ? std::string("vae/") : layout == "bfl" ? std::string("ae.safetensors")
                                                                              : std::string("ae.safetensors or vae/")) +
              ")");
}

void save_autoencoder_bfl(const std::string& file, const AutoencoderConfig& cfg, const TensorMap& bfl) {
  check_autoencoder_weights(cfg, bfl, file);
  safetensors::save(file, bfl, {{"fluxtrain_vae_config", cfg.to_diffusers_json().dump()}, {"format", "pt"}});
}

void save_autoencoder_diffusers(const std::string& dir, const AutoencoderConfig& cfg, const TensorMap& bfl) {
  make_directories(dir);
  safetensors::save(path_join(dir, "diffusion_pytorch_model.safetensors"), autoencoder_bfl_to_diffusers(cfg, bfl),
                    {{"format", "pt"}});
  write_text_file_atomic(path_join(dir, "config.json"), cfg.to_diffusers_json().dump(2));
}

std::vector<std::string> write_random_autoencoder(const std::string& dir, const std::string& size, uint64_t seed,
                                                  at::ScalarType dtype, const std::string& layout) {
  const AutoencoderConfig cfg = AutoencoderConfig::preset(size);
  const TensorMap w = init_random_autoencoder(cfg, seed, dtype);
  std::vector<std::string> wrote;
  make_directories(dir);
  if (layout != "diffusers") {
    save_autoencoder_bfl(path_join(dir, "ae.safetensors"), cfg, w);
    wrote.push_back(path_join(dir, "ae.safetensors"));
  }
  if (layout != "bfl") {
    save_autoencoder_diffusers(path_join(dir, "vae"), cfg, w);
    wrote.push_back(path_join(dir, "vae"));
    // A diffusers snapshot lists its components in model_index.json.
    const std::string index = path_join(dir, "model_index.json");
    if (path_exists(index)) {
      nlohmann::json j = nlohmann::json::parse(read_text_file(index));
      j["vae"] = {"diffusers", "AutoencoderKL"};
      write_text_file_atomic(index, j.dump(2));
    }
  }
  return wrote;
}

}  // namespace fluxtrain
