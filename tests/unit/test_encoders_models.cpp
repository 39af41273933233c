// Text encoders: LoRA gradients against central finite differences in float64 (1e-6), gradients
// reach only the trained LoRA, checkpointing on/off gives identical values and gradients,
// strict loading, LoRA state round trips, and the tiny snapshot that init-model writes.
// (Parity with transformers' CLIPTextModel / T5EncoderModel: tests/py/test_text_encoders.py.)
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "encoders/clip_text_model.h"
#include "encoders/hf_weights.h"
#include "encoders/t5_encoder.h"
#include "encoders/text_encoders.h"
#include "encoders/tiny_text_encoders.h"
#include "support/test_util.h"

using namespace fluxtrain;

namespace {

ClipTextConfig small_clip() {
  ClipTextConfig c = ClipTextConfig::tiny(8);
  c.vocab_size = 40;
  c.max_position_embeddings = 12;
  c.eos_token_id = 39;  // first-EOS pooling rule
  return c;
}

T5EncoderConfig small_t5() {
  T5EncoderConfig c = T5EncoderConfig::tiny(8);
  c.vocab_size = 40;
  c.num_heads = 2;
  c.d_kv = 4;
  c.relative_attention_num_buckets = 8;
  c.relative_attention_max_distance = 6;  // 10 tokens reach the logarithmic and the clamped buckets
  return c;
}

// LoRA with nonzero B so that every master has a gradient.
TextEncoderLora random_lora(const std::vector<TextLoraTarget>& t, uint64_t seed) {
  TextEncoderLora l = TextEncoderLora::create(t, 2, 3.0, seed);
  at::NoGradGuard ng;
  at::Generator gen = cpu_generator(seed + 100);
  for (auto& a : l.adapters()) a.B.normal_(0, 0.3, gen);
  l.to(at::kCPU, at::kDouble);
  return l;
}

// A scalar loss of both encoders' outputs with fixed random weights.
struct TwoEncoders {
  std::unique_ptr<ClipTextModel> clip;
  std::unique_ptr<T5Encoder> t5;
  TextEncoderLora clip_lora, t5_lora;
  at::Tensor clip_ids, t5_ids, wc, wt;
  TwoEncoders() {
    clip = std::make_unique<ClipTextModel>(small_clip(), random_clip_weights(small_clip(), 3, at::kFloat), "clip");
    t5 = std::make_unique<T5Encoder>(small_t5(), random_t5_weights(small_t5(), 3, at::kFloat), "t5");
    clip->to(at::kDouble, at::kCPU);
    t5->to(at::kDouble, at::kCPU);
    clip_lora = random_lora(ClipTextModel::lora_targets(small_clip()), 1);
    t5_lora = random_lora(T5Encoder::lora_targets(small_t5()), 2);
    at::Generator gen = cpu_generator(5);
    clip_ids = at::randint(0, 39, {2, 12}, gen, at::TensorOptions().dtype(at::kLong));
    clip_ids.index_put_({0, 7}, 39);
    clip_ids.index_put_({1, 11}, 39);
    t5_ids = at::randint(0, 40, {2, 10}, gen, at::TensorOptions().dtype(at::kLong));
    wc = at::randn({2, 8}, gen, at::TensorOptions().dtype(at::kDouble));
    wt = at::randn({2, 10, 8}, gen, at::TensorOptions().dtype(at::kDouble));
  }
  at::Tensor loss(bool ckpt) {
    at::Tensor p = clip->forward(clip_ids, &clip_lora, ckpt).pooled;
    at::Tensor h = t5->forward(t5_ids, &t5_lora, ckpt);
    return (p * wc).sum() + (h * wt).sum();
  }
};

}  // namespace

TEST(EncodersModels, LoraGradientsMatchFiniteDifferencesFloat64) {
  TwoEncoders s;
  s.loss(false).backward();
  double worst = 0;
  int checked = 0;
  for (TextEncoderLora* l : {&s.clip_lora, &s.t5_lora})
    for (const at::Tensor& p : l->parameters()) {
      const at::Tensor g = p.grad();
      ASSERT_TRUE(g.defined());
      for (int64_t k : {int64_t{0}, p.numel() / 2, p.numel() - 1}) {
        at::Tensor flat = p.detach().view(-1);
        const double orig = flat[k].item<double>(), eps = 1e-6;
        double lp, lm;
        {
          at::NoGradGuard ng;
          flat[k] = orig + eps;
          lp = s.loss(false).item<double>();
          flat[k] = orig - eps;
          lm = s.loss(false).item<double>();
          flat[k] = orig;
        }
        const double fd = (lp - lm) / (2 * eps), an = g.view(-1)[k].item<double>();
        worst = std::max(worst, std::abs(fd - an) / std::max(1.0, std::abs(an)));
        ++checked;
      }
    }
  EXPECT_GT(checked, 40);
  EXPECT_LT(worst, 1e-6);
}

TEST(EncodersModels, CheckpointingOnOffIdentical) {
  TwoEncoders a, b;
  at::Tensor la = a.loss(false), lb = b.loss(true);
  EXPECT_EQ(la.item<double>(), lb.item<double>());
  la.backward();
  lb.backward();
  auto pa = a.clip_lora.parameters(), pb = b.clip_lora.parameters();
  for (auto& p : a.t5_lora.parameters()) pa.push_back(p);
  for (auto& p : b.t5_lora.parameters()) pb.push_back(p);
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(at::equal(pa[i].grad(), pb[i].grad())) << i;
  // Values of the encoders alone, too.
  at::NoGradGuard ng;
  EXPECT_TRUE(at::equal(a.t5->forward(a.t5_ids, &a.t5_lora, false), a.t5->forward(a.t5_ids, &a.t5_lora, true)));
}

TEST(EncodersModels, GradientsReachOnlyTheTrainedLora) {
  TempDir d;
  write_tiny_text_encoders(d.dir(), 16, 32, 0, at::kFloat);
  for (bool both : {false, true}) {
    TextEncoderOptions o;
    o.train_text_encoder = both;
    o.train_text_encoder_one_only = !both;
    o.text_encoder_rank = 4;
    o.max_sequence_length = 16;
    TextEncoders enc = TextEncoders::load(TextEncoderSetup::for_training(d.dir(), o, at::kFloat, at::kCPU, 0, false));
    ASSERT_TRUE(enc.has_clip() && enc.has_t5());
    EXPECT_EQ(enc.t5_lora_parameters().empty(), !both);
    // B starts at zero (peft's init): make it nonzero so A gets a gradient as well.
    {
      at::NoGradGuard ng;
      for (auto& a : enc.clip_lora().adapters()) a.B.normal_(0, 0.1);
      for (auto& a : enc.t5_lora().adapters()) a.B.normal_(0, 0.1);
    }
    TextEncoding e = enc.encode({"a photo of a cat", "a dog"});
    EXPECT_EQ(e.pooled_prompt_embeds.sizes(), (std::vector<int64_t>{2, 16}));
    EXPECT_EQ(e.prompt_embeds.sizes(), (std::vector<int64_t>{2, 16, 32}));
    EXPECT_TRUE(e.pooled_prompt_embeds.requires_grad());
    EXPECT_EQ(e.prompt_embeds.requires_grad(), both);  // one_only: T5 frozen, no graph at all
    (e.pooled_prompt_embeds.square().sum() + e.prompt_embeds.square().sum()).backward();
    for (auto& p : enc.clip_lora_parameters()) {
      ASSERT_TRUE(p.grad().defined());
      EXPECT_GT(p.grad().abs().sum().item<double>(), 0);
    }
    for (auto& p : enc.t5_lora_parameters()) EXPECT_GT(p.grad().abs().sum().item<double>(), 0);
    // No frozen tensor takes part in autograd: none requires grad, none got a gradient.
    int frozen = 0;
    for (const EncoderLayerWeights* w : {&enc.clip()->weights(), &enc.t5()->weights()}) {
      std::vector<const TensorMap*> maps{&w->globals_};
      for (const auto& l : w->layers_) maps.push_back(&l);
      for (const TensorMap* m : maps)
        for (const auto& kv : *m) {
          EXPECT_FALSE(kv.second.requires_grad()) << kv.first;
          EXPECT_FALSE(kv.second.grad().defined()) << kv.first;
          ++frozen;
        }
    }
    EXPECT_GT(frozen, 40);
  }
}

TEST(EncodersModels, StrictLoadingNamesTheTensor) {
  const ClipTextConfig c = small_clip();
  TensorMap w = random_clip_weights(c, 0, at::kFloat);
  auto msg = [&](const TensorMap& m) {
    try {
      ClipTextModel x(c, m, "text_encoder");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_EQ(msg(w), "");
  TensorMap missing = w;
  missing.erase("text_model.encoder.layers.1.mlp.fc2.bias");
  EXPECT_EQ(msg(missing), "text_encoder: missing tensor 'text_model.encoder.layers.1.mlp.fc2.bias' (expected shape [8])");
  TensorMap shape = w;
  shape["text_model.final_layer_norm.weight"] = at::ones({9});
  EXPECT_NE(msg(shape).find("has shape [9], expected [8]"), std::string::npos);
  TensorMap extra = w;
  extra["text_model.encoder.layers.2.mlp.fc1.weight"] = at::ones({1});
  EXPECT_NE(msg(extra).find("unexpected tensor 'text_model.encoder.layers.2.mlp.fc1.weight'"), std::string::npos);
  TensorMap t5w = random_t5_weights(small_t5(), 0, at::kFloat);
  t5w["encoder.embed_tokens.weight"] = t5w["shared.weight"];  // tied copy: accepted
  EXPECT_NO_THROW(T5Encoder(small_t5(), t5w, "text_encoder_2"));
  t5w.erase("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
  EXPECT_THROW(T5Encoder(small_t5(), t5w, "text_encoder_2"), Error);
}

TEST(EncodersModels, TinySnapshotLoadsShardedAndLoraRoundTrips) {
  TempDir d;
  write_tiny_text_encoders(d.dir(), 16, 32, 7, at::kFloat);
  {
    const auto index = nlohmann::json::parse(read_text_file(d.path("text_encoder_2/model.safetensors.index.json")));
    std::set<std::string> shards;
    for (const auto& kv : index.at("weight_map").items()) shards.insert(kv.value().get<std::string>());
    EXPECT_GE(shards.size(), 2u);  // sharded, as FLUX's text_encoder_2/ is
    EXPECT_TRUE(path_exists(d.path("text_encoder/model.safetensors")));
    EXPECT_TRUE(path_exists(d.path("tokenizer/merges.txt")) && path_exists(d.path("tokenizer_2/spiece.model")));
  }
  TextEncoderOptions o;
  o.train_text_encoder = true;
  o.text_encoder_rank = 2;
  o.text_encoder_alpha = 5;
  o.max_sequence_length = 8;
  TextEncoders enc = TextEncoders::load(TextEncoderSetup::for_training(d.dir(), o, at::kFloat, at::kCPU, 1, true));
  {
    at::NoGradGuard ng;
    for (auto& a : enc.clip_lora().adapters()) a.B.normal_(0, 0.1);
    for (auto& a : enc.t5_lora().adapters()) a.B.normal_(0, 0.1);
  }
  const std::vector<std::string> caps{"an oil painting", ""};
  TextEncoding ref;
  {
    at::NoGradGuard ng;
    ref = enc.encode(caps);
  }
  const TensorMap st = enc.lora_state();
  EXPECT_TRUE(st.count("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"));
  EXPECT_TRUE(st.count("text_encoder_2.encoder.block.1.layer.0.SelfAttention.o.lora_B.weight"));
  EXPECT_EQ(st.size(), 2u * 4 * 2 * 2);
  // A fresh set (different seed) takes the state and then encodes identically.
  TextEncoders enc2 = TextEncoders::load(TextEncoderSetup::for_training(d.dir(), o, at::kFloat, at::kCPU, 9, false));
  enc2.load_lora_state(st, "state");
  // The diffusers-format file reads back through the generic loader with its alpha.
  enc.save_lora_diffusers(d.path("te_lora.safetensors"));
  TextEncoders enc3 = TextEncoders::load(TextEncoderSetup::for_training(d.dir(), TextEncoderOptions{}, at::kFloat,
                                                                        at::kCPU, 0, false));
  EXPECT_FALSE(enc3.has_clip());  // neither mode: nothing loaded
  TextEncoderSetup plain;
  plain.snapshot_dir = d.dir();
  plain.max_sequence_length = 8;
  TextEncoders enc4 = TextEncoders::load(plain);
  TextEncoderLoraFile f = load_text_encoder_lora_file(d.path("te_lora.safetensors"), &enc4.clip()->config(),
                                                      &enc4.t5()->config());
  EXPECT_EQ(f.clip.alpha(), 5);
  EXPECT_EQ(f.t5.rank(), 2);
  enc4.set_lora(std::move(f.clip), std::move(f.t5));
  at::NoGradGuard ng;
  for (TextEncoders* e : {&enc2, &enc4}) {
    TextEncoding r = e->encode(caps);
    EXPECT_TRUE(at::equal(r.pooled_prompt_embeds, ref.pooled_prompt_embeds));
    EXPECT_TRUE(at::equal(r.prompt_embeds, ref.prompt_embeds));
  }
  // Strictness: a state missing a key or with another rank is refused, naming the tensor.
  TensorMap bad = st;
  bad.erase("text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_A.weight");
  EXPECT_THROW(enc2.load_lora_state(bad, "ckpt"), Error);
}

TEST(EncodersModels, T5BucketsFollowTheFormula) {
  // Independent scalar re-computation of T5's bidirectional bucketing (32 buckets, 128 max distance).
  at::Tensor rel = at::arange(-300, 301, at::kLong);
  at::Tensor b = t5_relative_position_bucket(rel, 32, 128);
  for (int64_t i = 0; i < rel.numel(); ++i) {
    const int64_t r = rel[i].item<int64_t>();
    int64_t expect = r > 0 ? 16 : 0;
    const int64_t n = std::abs(r);
    if (n < 8)
      expect += n;
    else
      expect += std::min<int64_t>(15, 8 + static_cast<int64_t>(std::log(static_cast<float>(n) / 8.0f) /
                                                                   static_cast<float>(std::log(128.0 / 8.0)) * 8.0f));
    ASSERT_EQ(b[i].item<int64_t>(), expect) << r;
  }
}
