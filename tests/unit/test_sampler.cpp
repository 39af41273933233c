// The sampler (src/train/sampler.h): schedule formulas, the condition KV cache (exact: cached
// equals uncached sampling in float64), per-image seeds, conditions through the autoencoder.
// Parity with diffusers' FluxPipeline: tests/py/test_sampler_parity.py.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "encoders/autoencoder.h"
#include "encoders/autoencoder_weights.h"
#include "model/block_weights.h"
#include "model/condition_cache.h"
#include "model/flux_transformer.h"
#include "model/flux_weights.h"
#include "model/lora.h"
#include "model/position_ids.h"
#include "support/test_util.h"
#include "train/flow_matching.h"
#include "train/sampler.h"

using namespace fluxtrain;

namespace {

const auto kF64 = at::TensorOptions().dtype(at::kDouble);

LoraSet random_lora(const FluxConfig& cfg, LoraMode mode, int lora_num, uint64_t seed) {
  LoraConfig lc;
  lc.mode = mode;
  lc.lora_num = mode == LoraMode::EasyControl ? lora_num : 1;
  lc.ranks.clear();
  lc.alphas.clear();
  for (int n = 0; n < lc.lora_num; ++n) {
    lc.ranks.push_back(4 + n);
    lc.alphas.push_back(2.0 + 0.5 * n);
  }
  if (mode == LoraMode::Standard) lc.targets = {"to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"};
  LoraSet s = LoraSet::create(cfg, lc, seed, at::kDouble);
  at::manual_seed(seed + 1);
  at::NoGradGuard ng;
  for (auto& a : s.adapters()) a.up.copy_(at::randn(a.up.sizes(), kF64) * 0.3);
  return s;
}

TextConditioning random_text(const FluxConfig& cfg, int64_t n, uint64_t seed) {
  at::manual_seed(seed);
  return {at::randn({n, 5, cfg.context_in_dim}, kF64), at::randn({n, cfg.vec_in_dim}, kF64)};
}

// Packed condition latents [B, Lc, 64] for square grids of the given sides (subject, spatial, ...).
void random_conds(const FluxConfig& cfg, int64_t B, const std::vector<int64_t>& sides, int64_t noise_side,
                  std::vector<at::Tensor>* conds, std::vector<at::Tensor>* ids) {
  at::manual_seed(77);
  for (size_t n = 0; n < sides.size(); ++n) {
    const int64_t c = sides[n];
    conds->push_back(at::randn({1, c * c, cfg.in_channels}, kF64).expand({B, c * c, cfg.in_channels}));
    ids->push_back(n % 2 == 0 ? subject_position_ids(c, c) : spatial_position_ids(c, c, noise_side, noise_side));
  }
}

// Samples 3 steps of a tiny float64 model with the given LoRA, with and without the cache.
void cached_equals_uncached(const LoraSet* lora, const std::vector<int64_t>& cond_sides, bool guidance) {
  FluxConfig cfg = FluxConfig::preset(guidance ? "tiny" : "tiny-schnell");
  ResidentBlockWeights w(init_random_weights(cfg, 5, at::kDouble), cfg.depth, cfg.depth_single);
  const int64_t B = 2, lat = 8;  // 4x4 packed tokens
  std::vector<at::Tensor> conds, ids;
  random_conds(cfg, B, cond_sides, lat / 2, &conds, &ids);
  const TextConditioning text = random_text(cfg, B, 3);
  at::manual_seed(9);
  const at::Tensor noise = pack_latents(at::randn({B, cfg.in_channels / 4, lat, lat}, kF64));
  Sampler s({&cfg, &w, lora, nullptr, nullptr});
  SampleOptions o;
  o.steps = 3;
  o.guidance = 3.5;
  o.schedule = FlowSchedule::for_model(cfg);
  o.kv_cache = false;
  at::NoGradGuard ng;
  const at::Tensor plain = s.denoise(text, noise, lat, lat, conds, ids, o);
  o.kv_cache = true;
  int64_t bytes = 0;
  const at::Tensor cached = s.denoise(text, noise, lat, lat, conds, ids, o, &bytes);
  EXPECT_EQ(cached.scalar_type(), at::kDouble);
  const double err = (cached - plain).abs().max().item<double>();
  EXPECT_LE(err, 1e-12) << "cached vs uncached";
  std::printf("cached vs uncached, %zu condition(s): max |diff| %.3g\n", cond_sides.size(), err);
  if (!cond_sides.empty()) {
    EXPECT_GT(bytes, 0);
    // The conditions changed the picture (the test would be vacuous otherwise).
    const at::Tensor none = s.denoise(text, noise, lat, lat, {}, {}, o);
    EXPECT_GT((none - plain).abs().max().item<double>(), 1e-6);
  }
}

}  // namespace

TEST(SamplerSchedule, MatchesFluxPipelineFormulas) {
  FlowSchedule dev;  // dynamic: mu = 0.5 at 256 tokens, 1.15 at 4096
  EXPECT_NEAR(dev.mu(256), 0.5, 1e-15);
  EXPECT_NEAR(dev.mu(4096), 1.15, 1e-15);
  EXPECT_NEAR(dev.mu(1024), 0.5 + 0.65 * 768.0 / 3840.0, 1e-15);
  const auto s = dev.sigmas(4, 4096);
  ASSERT_EQ(s.size(), 5u);
  const double e = std::exp(1.15);
  const double t[4] = {1.0, 0.75, 0.5, 0.25};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(s[static_cast<size_t>(i)], e / (e + 1.0 / t[i] - 1.0), 1e-15);
  EXPECT_EQ(s[4], 0.0);
  EXPECT_EQ(s[0], 1.0);

  FluxConfig schnell = FluxConfig::preset("tiny-schnell");
  const auto u = FlowSchedule::for_model(schnell).sigmas(4, 4096);  // no shift: linspace(1, 1/4, 4), 0
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(u[static_cast<size_t>(i)], t[i], 1e-15);
  EXPECT_TRUE(FlowSchedule::for_model(FluxConfig::preset("tiny")).dynamic_shift);

  FlowSchedule st;
  st.dynamic_shift = false;
  st.shift = 3.0;
  EXPECT_NEAR(st.sigmas(2, 1)[1], 3.0 * 0.5 / (1.0 + 2.0 * 0.5), 1e-15);
  EXPECT_EQ(dev.sigmas(1, 300).size(), 2u);

  // diffusers' scheduler_config.json of FLUX.1-dev; options fluxtrain lacks are refused by name.
  const auto j = nlohmann::json::parse(R"({"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
      "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
      "use_dynamic_shifting": true, "shift_terminal": null, "use_karras_sigmas": false})");
  const FlowSchedule f = FlowSchedule::from_scheduler_json(j, "scheduler_config.json");
  EXPECT_TRUE(f.dynamic_shift);
  EXPECT_EQ(f.sigmas(4, 4096), s);
  auto k = j;
  k["use_karras_sigmas"] = true;
  try {
    FlowSchedule::from_scheduler_json(k, "scheduler_config.json");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("use_karras_sigmas"), std::string::npos);
  }
}

TEST(SamplerKvCache, CachedEqualsUncachedEasyControlLora) {
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const LoraSet lora = random_lora(cfg, LoraMode::EasyControl, 2, 11);
  cached_equals_uncached(&lora, {3, 2}, true);  // unequal sizes: subject + spatial
}

TEST(SamplerKvCache, CachedEqualsUncachedTwoEqualConditions) {
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const LoraSet lora = random_lora(cfg, LoraMode::EasyControl, 2, 12);
  cached_equals_uncached(&lora, {3, 3}, true);  // the batched condition attention
}

TEST(SamplerKvCache, CachedEqualsUncachedStandardLoraAndNoLora) {
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const LoraSet lora = random_lora(cfg, LoraMode::Standard, 1, 13);
  cached_equals_uncached(&lora, {3}, true);
  cached_equals_uncached(nullptr, {3}, true);
  cached_equals_uncached(nullptr, {3}, false);  // schnell-style: no guidance embedding
  cached_equals_uncached(nullptr, {}, true);    // no conditions: the cache is not used
}

TEST(SamplerKvCache, FilledCacheDoesNotReadTheConditions) {
  const FluxConfig cfg = FluxConfig::preset("tiny");
  ResidentBlockWeights w(init_random_weights(cfg, 6, at::kDouble), cfg.depth, cfg.depth_single);
  const LoraSet lora = random_lora(cfg, LoraMode::EasyControl, 1, 14);
  FluxInputs in;
  at::manual_seed(15);
  in.img = at::randn({1, 16, cfg.in_channels}, kF64);
  in.img_ids = noise_position_ids(4, 4);
  in.txt = at::randn({1, 5, cfg.context_in_dim}, kF64);
  in.txt_ids = text_position_ids(5);
  in.y = at::randn({1, cfg.vec_in_dim}, kF64);
  in.timesteps = at::full({1}, 0.7, kF64);
  in.guidance = at::full({1}, 3.5, kF64);
  in.cond = {at::randn({1, 9, cfg.in_channels}, kF64)};
  in.cond_ids = {subject_position_ids(3, 3)};
  at::NoGradGuard ng;
  const at::Tensor ref = flux_forward(cfg, w, &lora, in);
  ConditionCache cache;
  ForwardOptions fo;
  fo.condition_cache = &cache;
  const at::Tensor first = flux_forward(cfg, w, &lora, in, fo);
  ASSERT_TRUE(cache.filled());
  EXPECT_EQ(cache.cond_lens(), std::vector<int64_t>{9});
  in.cond.clear();  // the second call must get everything from the cache
  in.cond_ids.clear();
  const at::Tensor second = flux_forward(cfg, w, &lora, in, fo);
  EXPECT_LE((first - ref).abs().max().item<double>(), 1e-12);
  EXPECT_LE((second - ref).abs().max().item<double>(), 1e-12);
  // A batch the cache was not made for is an error, not a silent broadcast.
  in.img = at::randn({2, 16, cfg.in_channels}, kF64);
  in.txt = at::randn({2, 5, cfg.context_in_dim}, kF64);
  in.y = at::randn({2, cfg.vec_in_dim}, kF64);
  in.timesteps = at::full({2}, 0.7, kF64);
  in.guidance = at::full({2}, 3.5, kF64);
  EXPECT_THROW(flux_forward(cfg, w, &lora, in, fo), Error);
}

TEST(SamplerSeeds, ImageKIsTheSameWhateverTheBatch) {
  const FluxConfig cfg = FluxConfig::preset("tiny");
  ResidentBlockWeights w(init_random_weights(cfg, 7, at::kDouble), cfg.depth, cfg.depth_single);
  Sampler s({&cfg, &w, nullptr, nullptr, nullptr});
  const TextConditioning text = random_text(cfg, 3, 4);
  SampleOptions o;
  o.height = o.width = 64;
  o.steps = 2;
  o.seed = 123;
  o.batch = 3;
  const SampleResult all = s.sample(text, o);
  ASSERT_EQ(all.latents.sizes(), (std::vector<int64_t>{3, 16, 8, 8}));
  EXPECT_FALSE(all.images.defined());  // no autoencoder: latents only
  // Image 2 alone, as index 2 (a rank that draws only its share of the validation images).
  o.batch = 1;
  SampleInputs in;
  in.first_index = 2;
  const SampleResult one = s.sample(TextConditioning{text.prompt_embeds.narrow(0, 2, 1), text.pooled.narrow(0, 2, 1)}, o, in);
  EXPECT_LE((one.latents[0] - all.latents[2]).abs().max().item<double>(), 1e-12);
  // Another seed, another picture.
  o.seed = 124;
  const SampleResult other = s.sample(TextConditioning{text.prompt_embeds.narrow(0, 2, 1), text.pooled.narrow(0, 2, 1)}, o, in);
  EXPECT_GT((other.latents[0] - all.latents[2]).abs().max().item<double>(), 1e-3);
}

TEST(SamplerImages, ConditionImagesThroughTheAutoencoder) {
  const FluxConfig cfg = FluxConfig::preset("tiny");
  ResidentBlockWeights w(init_random_weights(cfg, 8, at::kDouble), cfg.depth, cfg.depth_single);
  const AutoencoderConfig acfg = AutoencoderConfig::tiny();
  Autoencoder ae(acfg, init_random_autoencoder(acfg, 1, at::kDouble));
  const LoraSet lora = random_lora(cfg, LoraMode::EasyControl, 2, 16);
  Sampler s({&cfg, &w, &lora, nullptr, &ae});
  SampleOptions o;
  o.height = 64;
  o.width = 48;
  o.steps = 2;
  o.cond_size = 32;
  SampleInputs in;
  at::manual_seed(3);
  in.conditions.push_back({SampleCondition::Kind::Subject, at::randint(256, {20, 30, 3}, at::kByte), {}});
  in.conditions.push_back({SampleCondition::Kind::Spatial, at::randint(256, {40, 40, 3}, at::kByte), {}});
  const TextConditioning text = random_text(cfg, 2, 5);
  o.batch = 2;
  const SampleResult r = s.sample(text, o, in);
  ASSERT_EQ(r.images.sizes(), (std::vector<int64_t>{2, 64, 48, 3}));
  EXPECT_EQ(r.images.scalar_type(), at::kByte);
  ASSERT_EQ(r.decoded.sizes(), (std::vector<int64_t>{2, 3, 64, 48}));
  o.kv_cache = false;
  const SampleResult u = s.sample(text, o, in);
  EXPECT_LE((u.decoded - r.decoded).abs().max().item<double>(), 1e-12);
  EXPECT_GT(r.cache_bytes, 0);
  EXPECT_EQ(u.cache_bytes, 0);
}

TEST(SamplerOptions, BadSizesAreOneLineErrors) {
  SampleOptions o;
  o.height = 100;
  try {
    check_sample_options(o);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--height"), std::string::npos);
  }
  o.height = 64;
  o.width = 0;
  EXPECT_THROW(check_sample_options(o), Error);
  o.width = 64;
  o.steps = 0;
  EXPECT_THROW(check_sample_options(o), Error);
}
