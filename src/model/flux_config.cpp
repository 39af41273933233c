#include "model/flux_config.h"

#include <numeric>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace fluxtrain {

void FluxConfig::validate(const std::string& where) const {
  auto bad = [&](const std::string& what) { throw Error(where + ": invalid transformer config: " + what); };
  if (hidden_size <= 0 || num_heads <= 0 || hidden_size % num_heads != 0)
    bad("hidden size " + std::to_string(hidden_size) + " is not a multiple of " + std::to_string(num_heads) + " heads");
  if (axes_dim.size() != 3) bad("axes_dims_rope needs 3 entries");
  int64_t sum = 0;
  for (int64_t a : axes_dim) {
    if (a <= 0 || a % 2 != 0) bad("axes_dims_rope entries must be positive and even");
    sum += a;
  }
  if (sum != head_dim())
    bad("axes_dims_rope sum " + std::to_string(sum) + " != head dim " + std::to_string(head_dim()));
  if (depth < 0 || depth_single < 0 || depth + depth_single == 0) bad("no blocks");
  if (in_channels <= 0 || out_channels <= 0 || context_in_dim <= 0 || vec_in_dim <= 0) bad("non-positive dimension");
}

FluxConfig FluxConfig::preset(const std::string& name) {
  FluxConfig c;
  if (name == "flux-dev") return c;
  if (name == "flux-schnell") {
    c.guidance_embed = false;
    return c;
  }
  if (name == "tiny") {
    // Real layout and token format (64 = 16 latent channels x 2x2), tiny widths.
    c.hidden_size = 64;
    c.num_heads = 4;
    c.axes_dim = {4, 6, 6};
    c.depth = 2;
    c.depth_single = 2;
    c.context_in_dim = 32;
    c.vec_in_dim = 16;
    return c;
  }
  if (name == "tiny-schnell") {
    c = preset("tiny");
    c.guidance_embed = false;
    return c;
  }
  throw Error("unknown model size '" + name + "' (expected tiny, tiny-schnell, flux-dev or flux-schnell)");
}

FluxConfig FluxConfig::from_diffusers_json(const nlohmann::json& j, const std::string& file) {
  FluxConfig c;
  try {
    if (j.contains("_class_name") && j["_class_name"] != "FluxTransformer2DModel")
      throw Error("_class_name is " + j["_class_name"].get<std::string>() + ", expected FluxTransformer2DModel");
    if (j.value("patch_size", 1) != 1) throw Error("patch_size must be 1");
    c.in_channels = j.value("in_channels", int64_t{64});
    c.out_channels = (j.contains("out_channels") && !j["out_channels"].is_null()) ? j["out_channels"].get<int64_t>()
                                                                                 : c.in_channels;
    c.num_heads = j.value("num_attention_heads", int64_t{24});
    c.hidden_size = c.num_heads * j.value("attention_head_dim", int64_t{128});
    c.depth = j.value("num_layers", int64_t{19});
    c.depth_single = j.value("num_single_layers", int64_t{38});
    c.context_in_dim = j.value("joint_attention_dim", int64_t{4096});
    c.vec_in_dim = j.value("pooled_projection_dim", int64_t{768});
    c.guidance_embed = j.value("guidance_embeds", false);
    if (j.contains("axes_dims_rope")) c.axes_dim = j["axes_dims_rope"].get<std::vector<int64_t>>();
  } catch (const Error& e) {
    throw Error(file + ": " + e.what());
  } catch (const std::exception& e) {
    throw Error(file + ": bad transformer config (" + std::string(e.what()) + ")");
  }
  c.validate(file);
  return c;
}

nlohmann::json FluxConfig::to_diffusers_json() const {
  return {{"_class_name", "FluxTransformer2DModel"},
          {"_diffusers_version", "0.30.0"},
          {"attention_head_dim", head_dim()},
          {"axes_dims_rope", axes_dim},
          {"guidance_embeds", guidance_embed},
          {"in_channels", in_channels},
          {"joint_attention_dim", context_in_dim},
          {"num_attention_heads", num_heads},
          {"num_layers", depth},
          {"num_single_layers", depth_single},
          {"out_channels", out_channels},
          {"patch_size", 1},
          {"pooled_projection_dim", vec_in_dim}};
}

bool FluxConfig::operator==(const FluxConfig& o) const {
  return in_channels == o.in_channels && out_channels == o.out_channels && hidden_size == o.hidden_size &&
         num_heads == o.num_heads && depth == o.depth && depth_single == o.depth_single &&
         mlp_ratio == o.mlp_ratio && context_in_dim == o.context_in_dim && vec_in_dim == o.vec_in_dim &&
         axes_dim == o.axes_dim && theta == o.theta && guidance_embed == o.guidance_embed &&
         qkv_bias == o.qkv_bias;
}

}  // namespace fluxtrain
