// Tiled application (src/encoders/autoencoder.h run_tiled): the blend weights form a partition of
// unity, so a function without spatial context is reproduced exactly whatever the tiling; and the
// autoencoder's strict loading / config checks. Network parity with diffusers:
// tests/py/test_autoencoder.py.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"
#include "encoders/autoencoder.h"
#include "encoders/autoencoder_weights.h"
#include "support/test_util.h"

namespace fluxtrain {
namespace {

TEST(AutoencoderTiling, LocalFunctionsAreReproducedExactly) {
  at::Generator g = cpu_generator(1);
  const at::Tensor x = at::randn({2, 3, 40, 72}, g, at::TensorOptions().dtype(at::kDouble));
  // Pointwise: scale 1.
  auto pointwise = [](const at::Tensor& t) { return t * 2 + 1; };
  // 8x nearest upsampling (like a decoder without context): scale 8.
  auto up = [](const at::Tensor& t) { return at::upsample_nearest2d(t, {t.size(2) * 8, t.size(3) * 8}); };
  // 8x average pooling (an encoder without context): scale 1/8.
  auto down = [](const at::Tensor& t) { return at::avg_pool2d(t, {8, 8}); };
  for (auto [tile, overlap] : std::vector<std::pair<int64_t, int64_t>>{{16, 8}, {24, 8}, {32, 16}, {64, 0}}) {
    EXPECT_LT(rel_err(run_tiled(x, tile, overlap, 1.0, pointwise), pointwise(x)), 1e-14) << tile << "/" << overlap;
    EXPECT_LT(rel_err(run_tiled(x, tile, overlap, 8.0, up), up(x)), 1e-14) << tile << "/" << overlap;
    EXPECT_LT(rel_err(run_tiled(x, tile, overlap, 1.0 / 8, down), down(x)), 1e-14) << tile << "/" << overlap;
  }
  EXPECT_TRUE(at::equal(run_tiled(x, 128, 16, 1.0, pointwise), pointwise(x))) << "image inside one tile";
}

TEST(AutoencoderTiling, TiledEncodeDecodeShapesAndCloseness) {
  const AutoencoderConfig cfg = AutoencoderConfig::tiny();
  Autoencoder ae(cfg, init_random_autoencoder(cfg, 3, at::kFloat));
  const at::Tensor ramp = at::linspace(-1, 1, 96, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor img = at::stack({ramp.view({1, 96}).expand({64, 96}), ramp.view({1, 96}).expand({64, 96}) * 0.5,
                                    ramp.view({1, 96}).expand({64, 96}) * -0.3})
                             .unsqueeze(0);
  const at::Tensor z = ae.encode(img), zt = ae.encode(img, {32, 16});
  EXPECT_EQ(z.sizes(), (std::vector<int64_t>{1, 16, 8, 12}));
  EXPECT_EQ(zt.sizes(), z.sizes());
  const at::Tensor d = ae.decode(z), dt = ae.decode(z, {32, 16});
  EXPECT_EQ(d.sizes(), (std::vector<int64_t>{1, 3, 64, 96}));
  EXPECT_EQ(dt.sizes(), d.sizes());
  EXPECT_THROW(ae.encode(at::zeros({1, 3, 60, 64})), Error);        // not a multiple of 8
  EXPECT_THROW(ae.decode(at::zeros({1, 4, 8, 8})), Error);          // wrong latent channels
  EXPECT_THROW(ae.decode(z, {24, 8}), Error);                       // tile not a multiple of 16
}

TEST(AutoencoderWeights, StrictChecksAndLayoutsRoundTrip) {
  const AutoencoderConfig cfg = AutoencoderConfig::tiny();
  TensorMap w = init_random_autoencoder(cfg, 0, at::kFloat);
  const TensorMap diff = autoencoder_bfl_to_diffusers(cfg, w);
  EXPECT_EQ(diff.size(), w.size());
  EXPECT_EQ(diff.at("decoder.mid_block.attentions.0.to_q.weight").dim(), 2);
  EXPECT_TRUE(diff.count("decoder.up_blocks.0.upsamplers.0.conv.weight"));  // BFL decoder.up.3
  EXPECT_TRUE(at::equal(diff.at("decoder.up_blocks.0.resnets.0.conv1.weight"), w.at("decoder.up.3.block.0.conv1.weight")));
  const TensorMap back = autoencoder_diffusers_to_bfl(cfg, diff, "x");
  for (const auto& kv : w) EXPECT_TRUE(at::equal(back.at(kv.first), kv.second)) << kv.first;
  TensorMap missing = w;
  missing.erase("encoder.conv_out.bias");
  try {
    check_autoencoder_weights(cfg, missing, "ae.safetensors");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ae.safetensors: missing key encoder.conv_out.bias"), std::string::npos);
  }
  TensorMap extra = w;
  extra["encoder.extra"] = at::zeros({1});
  EXPECT_THROW(check_autoencoder_weights(cfg, extra, "x"), Error);
  nlohmann::json j = AutoencoderConfig::flux().to_diffusers_json();
  EXPECT_TRUE(AutoencoderConfig::from_diffusers_json(j, "c") == AutoencoderConfig::flux());
  j["use_quant_conv"] = true;
  EXPECT_THROW(AutoencoderConfig::from_diffusers_json(j, "c"), Error);
  // 84M parameters at FLUX size, like BFL's ae.safetensors.
  int64_t n = 0;
  for (const auto& kv : autoencoder_weight_shapes(AutoencoderConfig::flux())) {
    int64_t e = 1;
    for (int64_t s : kv.second) e *= s;
    n += e;
  }
  EXPECT_EQ(n, 83819683);
}

}  // namespace
}  // namespace fluxtrain
