#include "encoders/autoencoder.h"

#include <algorithm>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "encoders/autoencoder_weights.h"

namespace fluxtrain {

// ---------------------------------------------------------------------------------------------
void AutoencoderConfig::validate(const std::string& where) const {
  auto bad = [&](const std::string& m) { throw Error(where + ": autoencoder config: " + m); };
  if (in_channels <= 0 || out_channels <= 0 || latent_channels <= 0) bad("channel counts must be positive");
  if (block_out_channels.empty() || block_out_channels.size() > 6) bad("block_out_channels must have 1..6 entries");
  if (layers_per_block <= 0) bad("layers_per_block must be positive");
  if (norm_num_groups <= 0) bad("norm_num_groups must be positive");
  for (int64_t c : block_out_channels)
    if (c <= 0 || c % norm_num_groups)
      bad("every block width must be a positive multiple of norm_num_groups " + std::to_string(norm_num_groups) +
          " (got " + std::to_string(c) + ")");
  if (!(scaling_factor > 0)) bad("scaling_factor must be positive");
}

AutoencoderConfig AutoencoderConfig::flux() { return AutoencoderConfig{}; }

AutoencoderConfig AutoencoderConfig::tiny() {
  AutoencoderConfig c;
  c.block_out_channels = {32, 32, 64, 64};
  c.layers_per_block = 1;
  return c;
}

AutoencoderConfig AutoencoderConfig::preset(const std::string& name) {
  if (name == "tiny" || name == "tiny-schnell") return tiny();
  if (name == "flux" || name == "flux-dev" || name == "flux-schnell") return flux();
  throw Error("unknown autoencoder size '" + name + "' (expected tiny or flux)");
}

AutoencoderConfig AutoencoderConfig::from_diffusers_json(const nlohmann::json& j, const std::string& file) {
  AutoencoderConfig c;
  try {
    if (j.contains("_class_name") && j["_class_name"] != "AutoencoderKL")
      throw Error("_class_name is " + j["_class_name"].get<std::string>() + ", expected AutoencoderKL");
    c.in_channels = j.value("in_channels", int64_t{3});
    c.out_channels = j.value("out_channels", int64_t{3});
    c.block_out_channels = j.value("block_out_channels", std::vector<int64_t>{64});
    c.layers_per_block = j.value("layers_per_block", int64_t{1});
    c.latent_channels = j.value("latent_channels", int64_t{4});
    c.norm_num_groups = j.value("norm_num_groups", int64_t{32});
    c.scaling_factor = j.value("scaling_factor", 0.18215);
    c.shift_factor = (j.contains("shift_factor") && !j["shift_factor"].is_null()) ? j["shift_factor"].get<double>() : 0.0;
    // diffusers' defaults for these differ from FLUX's VAE; what FLUX does not have is refused.
    if (j.value("use_quant_conv", true)) throw Error("use_quant_conv must be false (FLUX's VAE has no quant_conv)");
    if (j.value("use_post_quant_conv", true)) throw Error("use_post_quant_conv must be false (FLUX's VAE has none)");
    if (!j.value("mid_block_add_attention", true)) throw Error("mid_block_add_attention must be true");
    if (j.value("act_fn", std::string("silu")) != "silu") throw Error("act_fn must be silu");
    for (const char* key : {"down_block_types", "up_block_types"}) {
      if (!j.contains(key)) continue;
      const auto types = j[key].get<std::vector<std::string>>();
      const std::string want = key[0] == 'd' ? "DownEncoderBlock2D" : "UpDecoderBlock2D";
      if (types.size() != c.block_out_channels.size())
        throw Error(std::string(key) + " must have one entry per block_out_channels");
      for (const auto& t : types)
        if (t != want) throw Error(std::string(key) + ": block type " + t + ", expected " + want);
    }
    if (j.contains("latents_mean") && !j["latents_mean"].is_null())
      throw Error("latents_mean/latents_std are not supported (FLUX uses shift_factor/scaling_factor)");
  } catch (const Error& e) {
    throw Error(file + ": " + e.what());
  } catch (const std::exception& e) {
    throw Error(file + ": bad autoencoder config (" + std::string(e.what()) + ")");
  }
  c.validate(file);
  return c;
}

nlohmann::json AutoencoderConfig::to_diffusers_json() const {
  const std::vector<std::string> down(block_out_channels.size(), "DownEncoderBlock2D");
  const std::vector<std::string> up(block_out_channels.size(), "UpDecoderBlock2D");
  return {{"_class_name", "AutoencoderKL"},
          {"_diffusers_version", "0.30.0"},
          {"act_fn", "silu"},
          {"block_out_channels", block_out_channels},
          {"down_block_types", down},
          {"force_upcast", true},
          {"in_channels", in_channels},
          {"latent_channels", latent_channels},
          {"latents_mean", nullptr},
          {"latents_std", nullptr},
          {"layers_per_block", layers_per_block},
          {"mid_block_add_attention", true},
          {"norm_num_groups", norm_num_groups},
          {"out_channels", out_channels},
          {"sample_size", 1024},
          {"scaling_factor", scaling_factor},
          {"shift_factor", shift_factor},
          {"up_block_types", up},
          {"use_post_quant_conv", false},
          {"use_quant_conv", false}};
}

bool AutoencoderConfig::operator==(const AutoencoderConfig& o) const {
  return in_channels == o.in_channels && out_channels == o.out_channels &&
         block_out_channels == o.block_out_channels && layers_per_block == o.layers_per_block &&
         latent_channels == o.latent_channels && norm_num_groups == o.norm_num_groups &&
         scaling_factor == o.scaling_factor && shift_factor == o.shift_factor;
}

// ---------------------------------------------------------------------------------------------
Autoencoder::Autoencoder(const AutoencoderConfig& cfg, TensorMap weights) : cfg_(cfg), w_(std::move(weights)) {
  cfg_.validate("autoencoder");
  check_autoencoder_weights(cfg_, w_, "autoencoder");
}

void Autoencoder::to(const at::TensorOptions& opts) {
  for (auto& kv : w_) kv.second = kv.second.to(opts);
}

const at::Tensor& Autoencoder::p(const std::string& name) const {
  auto it = w_.find(name);
  if (it == w_.end()) throw Error("autoencoder: weight " + name + " missing", ErrorKind::Internal);
  return it->second;
}

at::Tensor Autoencoder::conv(const at::Tensor& x, const std::string& prefix, int64_t stride, int64_t pad) const {
  return at::conv2d(x, p(prefix + ".weight"), p(prefix + ".bias"), {stride, stride}, {pad, pad});
}

at::Tensor Autoencoder::group_norm(const at::Tensor& x, const std::string& prefix) const {
  return at::group_norm(x, cfg_.norm_num_groups, p(prefix + ".weight"), p(prefix + ".bias"), 1e-6);
}

namespace {
at::Tensor silu_inplace(at::Tensor t) {
  at::silu_(t);
  return t;
}
}  // namespace

at::Tensor Autoencoder::resnet(const at::Tensor& x, const std::string& b) const {
  at::Tensor h = silu_inplace(group_norm(x, b + ".norm1"));
  h = conv(h, b + ".conv1", 1, 1);
  h = silu_inplace(group_norm(h, b + ".norm2"));
  h = conv(h, b + ".conv2", 1, 1);
  const std::string sc = b + ".nin_shortcut";
  if (w_.count(sc + ".weight")) return h.add_(conv(x, sc, 1, 0));
  return h.add_(x);
}

at::Tensor Autoencoder::attention(const at::Tensor& x, const std::string& b) const {
  // One head over every position: q, k, v are [B, 1, HW, C]; softmax(q k^T / sqrt(C)) v.
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const at::Tensor hn = group_norm(x, b + ".norm");
  auto tokens = [&](const char* name) { return conv(hn, b + "." + name, 1, 0).flatten(2).transpose(1, 2).unsqueeze(1); };
  at::Tensor a = at::scaled_dot_product_attention(tokens("q"), tokens("k"), tokens("v"));
  a = a.squeeze(1).transpose(1, 2).reshape({B, C, H, W});
  return x + conv(a, b + ".proj_out", 1, 0);
}

at::Tensor Autoencoder::run_encoder(const at::Tensor& images) const {
  at::NoGradGuard no_grad;
  at::Tensor h = conv(images, "encoder.conv_in", 1, 1);
  const int64_t L = cfg_.num_levels();
  for (int64_t i = 0; i < L; ++i) {
    const std::string lv = "encoder.down." + std::to_string(i);
    for (int64_t j = 0; j < cfg_.layers_per_block; ++j) h = resnet(h, lv + ".block." + std::to_string(j));
    if (i != L - 1) h = conv(at::constant_pad_nd(h, {0, 1, 0, 1}, 0), lv + ".downsample.conv", 2, 0);
  }
  h = resnet(h, "encoder.mid.block_1");
  h = attention(h, "encoder.mid.attn_1");
  h = resnet(h, "encoder.mid.block_2");
  h = silu_inplace(group_norm(h, "encoder.norm_out"));
  return conv(h, "encoder.conv_out", 1, 1);
}

at::Tensor Autoencoder::run_decoder(const at::Tensor& z) const {
  at::NoGradGuard no_grad;
  at::Tensor h = conv(z, "decoder.conv_in", 1, 1);
  h = resnet(h, "decoder.mid.block_1");
  h = attention(h, "decoder.mid.attn_1");
  h = resnet(h, "decoder.mid.block_2");
  for (int64_t i = cfg_.num_levels() - 1; i >= 0; --i) {
    const std::string lv = "decoder.up." + std::to_string(i);
    for (int64_t j = 0; j <= cfg_.layers_per_block; ++j) h = resnet(h, lv + ".block." + std::to_string(j));
    if (i != 0) h = conv(at::upsample_nearest2d(h, {h.size(2) * 2, h.size(3) * 2}), lv + ".upsample.conv", 1, 1);
  }
  h = silu_inplace(group_norm(h, "decoder.norm_out"));
  return conv(h, "decoder.conv_out", 1, 1);
}

namespace {

// Tile starts along one axis of length n: every `tile - overlap`, the last one flush with the end.
std::vector<int64_t> tile_starts(int64_t n, int64_t tile, int64_t overlap) {
  if (n <= tile) return {0};
  std::vector<int64_t> s;
  for (int64_t a = 0; a + tile < n; a += tile - overlap) s.push_back(a);
  s.push_back(n - tile);
  return s;
}

// Blend weights of tile k along one axis (output units): a linear ramp over the overlap with the
// previous tile and with the next; two overlapping ramps sum to one at every position.
at::Tensor axis_weights(const std::vector<int64_t>& starts, size_t k, int64_t tile, int64_t n, double scale) {
  const int64_t len = std::min(tile, n);
  const int64_t out = static_cast<int64_t>(len * scale);
  at::Tensor w = at::ones({out}, at::kFloat);
  auto acc = w.accessor<float, 1>();
  if (k > 0) {
    const int64_t ov = static_cast<int64_t>((starts[k - 1] + tile - starts[k]) * scale);
    for (int64_t i = 0; i < ov && i < out; ++i) acc[i] = std::min(acc[i], static_cast<float>((i + 0.5) / ov));
  }
  if (k + 1 < starts.size()) {
    const int64_t ov = static_cast<int64_t>((starts[k] + tile - starts[k + 1]) * scale);
    for (int64_t i = 0; i < ov && i < out; ++i)
      acc[out - 1 - i] = std::min(acc[out - 1 - i], static_cast<float>((i + 0.5) / ov));
  }
  return w;
}

}  // namespace

at::Tensor run_tiled(const at::Tensor& x, int64_t tile, int64_t overlap, double scale,
                     const std::function<at::Tensor(const at::Tensor&)>& f) {
  const int64_t H = x.size(2), W = x.size(3);
  if (tile <= 0 || (H <= tile && W <= tile)) return f(x);
  check_input(overlap >= 0 && overlap < tile, "tiling: overlap must be in [0, tile)");
  const auto rows = tile_starts(H, tile, overlap), cols = tile_starts(W, tile, overlap);
  const int64_t OH = static_cast<int64_t>(H * scale), OW = static_cast<int64_t>(W * scale);
  at::Tensor out, wsum;
  for (size_t r = 0; r < rows.size(); ++r) {
    const at::Tensor wr = axis_weights(rows, r, tile, H, scale);
    for (size_t c = 0; c < cols.size(); ++c) {
      const at::Tensor wc = axis_weights(cols, c, tile, W, scale);
      const int64_t th = std::min(tile, H), tw = std::min(tile, W);
      at::Tensor y = f(x.narrow(2, rows[r], th).narrow(3, cols[c], tw));
      if (!out.defined()) {
        out = at::zeros({y.size(0), y.size(1), OH, OW},
                       y.options().dtype(y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
        wsum = at::zeros({OH, OW}, out.options());
      }
      const at::Tensor w2 = at::outer(wr, wc).to(out.options());
      const int64_t oy = static_cast<int64_t>(rows[r] * scale), ox = static_cast<int64_t>(cols[c] * scale);
      out.narrow(2, oy, y.size(2)).narrow(3, ox, y.size(3)).add_(y.to(out.scalar_type()) * w2);
      wsum.narrow(0, oy, y.size(2)).narrow(1, ox, y.size(3)).add_(w2);
    }
  }
  return out.div_(wsum);  // float32 (float64 for float64 input); callers cast back
}

namespace {
void check_grid(const at::Tensor& t, int64_t channels, int64_t multiple, const char* what) {
  check_input(t.dim() == 4 && t.size(1) == channels && t.size(2) > 0 && t.size(3) > 0 && t.size(2) % multiple == 0 &&
                  t.size(3) % multiple == 0,
              std::string("autoencoder: ") + what + " must be [B, " + std::to_string(channels) + ", H, W] with H and W " +
                  (multiple > 1 ? "positive multiples of " + std::to_string(multiple) : std::string("positive")) +
                  ", got " + (t.dim() == 4 ? "[" + std::to_string(t.size(0)) + ", " + std::to_string(t.size(1)) + ", " +
                                                 std::to_string(t.size(2)) + ", " + std::to_string(t.size(3)) + "]"
                                           : std::to_string(t.dim()) + " dimensions"));
}
}  // namespace

at::Tensor Autoencoder::encode_moments(const at::Tensor& images, const TileOptions& tile) const {
  const int64_t f = cfg_.downscale();
  check_grid(images, cfg_.in_channels, f, "images");
  const at::Tensor& w0 = p("encoder.conv_in.weight");
  const at::Tensor x = images.to(w0.options());
  if (!tile.enabled()) return run_encoder(x);
  check_input(tile.tile_px % (2 * f) == 0 && tile.overlap_px % f == 0,
              "autoencoder: tile size must be a multiple of " + std::to_string(2 * f) + " and overlap of " +
                  std::to_string(f) + " pixels");
  at::Tensor m = run_tiled(x, tile.tile_px, tile.overlap_px, 1.0 / static_cast<double>(f),
                           [this](const at::Tensor& t) { return run_encoder(t); });
  return m.to(w0.scalar_type());
}

at::Tensor Autoencoder::encode(const at::Tensor& images, const TileOptions& tile) const {
  const at::Tensor m = encode_moments(images, tile);
  return (m.narrow(1, 0, cfg_.latent_channels) - cfg_.shift_factor) * cfg_.scaling_factor;
}

at::Tensor Autoencoder::decode(const at::Tensor& latents, const TileOptions& tile) const {
  const int64_t f = cfg_.downscale();
  check_grid(latents, cfg_.latent_channels, 1, "latents");
  const at::Tensor& w0 = p("decoder.conv_in.weight");
  const at::Tensor z = latents.to(w0.options()) / cfg_.scaling_factor + cfg_.shift_factor;
  if (!tile.enabled()) return run_decoder(z);
  check_input(tile.tile_px % (2 * f) == 0 && tile.overlap_px % f == 0,
              "autoencoder: tile size must be a multiple of " + std::to_string(2 * f) + " and overlap of " +
                  std::to_string(f) + " pixels");
  at::Tensor img = run_tiled(z, tile.tile_px / f, tile.overlap_px / f, static_cast<double>(f),
                             [this](const at::Tensor& t) { return run_decoder(t); });
  return img.to(w0.scalar_type());
}

}  // namespace fluxtrain
