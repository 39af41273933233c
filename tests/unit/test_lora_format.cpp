// LoRA file formats (model/lora_format.h, model/lora_io.h): kohya key names for the full
// FLUX.1-dev layout against a table written from kohya's naming rule, bit-exact round trips
// between the formats, alpha carried so that other readers see alpha/rank, and the errors for
// what a format cannot express.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/safetensors.h"
#include "encoders/clip_text_model.h"
#include "encoders/t5_encoder.h"
#include "encoders/text_encoders.h"
#include "model/flux_config.h"
#include "model/lora_format.h"
#include "model/lora_io.h"
#include "support/test_util.h"

namespace fluxtrain {
namespace {

const std::vector<std::string> kAllTargets = {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                              "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                              "ff_context.net.2", "proj_mlp", "proj_out"};

LoraSet standard_set(const FluxConfig& cfg, int64_t rank, double alpha, std::vector<std::string> targets = kAllTargets,
                     std::vector<int> blocks = {}) {
  LoraConfig lc;
  lc.mode = LoraMode::Standard;
  lc.ranks = {rank};
  lc.alphas = {alpha};
  lc.targets = std::move(targets);
  lc.blocks = std::move(blocks);
  LoraSet s = LoraSet::create(cfg, lc, 7);
  // up is zero at init: give it values so that a misplaced block would show.
  at::NoGradGuard ng;
  int k = 1;
  for (auto& a : s.adapters()) a.up.copy_(at::randn(a.up.sizes(), at::TensorOptions().dtype(at::kFloat)) * (0.01 * k++));
  return s;
}

LoraSet easycontrol_set(const FluxConfig& cfg) {
  LoraConfig lc;
  lc.mode = LoraMode::EasyControl;
  lc.lora_num = 2;
  lc.ranks = {4, 2};
  lc.alphas = {4, 1};
  LoraSet s = LoraSet::create(cfg, lc, 3);
  at::NoGradGuard ng;
  for (auto& a : s.adapters()) a.up.copy_(at::randn(a.up.sizes()));
  return s;
}

void expect_same_weights(const LoraSet& a, const LoraSet& b) {
  ASSERT_EQ(a.adapters().size(), b.adapters().size());
  for (size_t i = 0; i < a.adapters().size(); ++i) {
    const auto &x = a.adapters()[i], &y = b.adapters()[i];
    EXPECT_EQ(x.block, y.block);
    EXPECT_EQ(x.target, y.target);
    EXPECT_EQ(x.scale, y.scale) << x.key;
    EXPECT_TRUE(at::equal(x.down, y.down)) << x.key;
    EXPECT_TRUE(at::equal(x.up, y.up)) << x.key;
  }
}

// kohya's rule: "lora_unet_" + the BFL module path with '.' replaced by '_' (sd-scripts'
// networks/lora_flux.py; ComfyUI maps the same names back onto BFL's modules).
TEST(LoraFormat, KohyaNamesFullFluxDev) {
  const FluxConfig cfg = FluxConfig::preset("flux-dev");
  ASSERT_EQ(cfg.depth, 19);
  ASSERT_EQ(cfg.depth_single, 38);
  const int64_t r = 2, H = 3072, M = 12288;
  const LoraSet set = standard_set(cfg, r, 1.0);
  const TensorMap m = export_lora(cfg, set, LoraFormat::Kohya);
  // The expected table: module -> (down shape, up shape, alpha); alpha 1 at rank 2 is scale 0.5,
  // and a module's alpha is that scale times its stacked rank.
  std::map<std::string, std::tuple<std::vector<int64_t>, std::vector<int64_t>, double>> want;
  for (int i = 0; i < 19; ++i) {
    const std::string d = "lora_unet_double_blocks_" + std::to_string(i) + "_";
    for (const char* s : {"img", "txt"}) {
      want[d + s + "_attn_qkv"] = {{3 * r, H}, {3 * H, 3 * r}, 3.0 * r * 0.5};
      want[d + s + "_attn_proj"] = {{r, H}, {H, r}, 0.5 * r};
      want[d + s + "_mlp_0"] = {{r, H}, {M, r}, 0.5 * r};
      want[d + s + "_mlp_2"] = {{r, M}, {H, r}, 0.5 * r};
    }
  }
  for (int i = 0; i < 38; ++i) {
    const std::string s = "lora_unet_single_blocks_" + std::to_string(i) + "_";
    want[s + "linear1"] = {{4 * r, H}, {3 * H + M, 4 * r}, 4.0 * r * 0.5};
    want[s + "linear2"] = {{r, H + M}, {H, r}, 0.5 * r};
  }
  EXPECT_EQ(want.size(), 19u * 8 + 38u * 2);
  EXPECT_EQ(m.size(), 3 * want.size());
  for (const auto& [name, w] : want) {
    const auto& [down, up, alpha] = w;
    ASSERT_TRUE(m.count(name + ".lora_down.weight")) << name;
    ASSERT_TRUE(m.count(name + ".lora_up.weight")) << name;
    ASSERT_TRUE(m.count(name + ".alpha")) << name;
    EXPECT_EQ(m.at(name + ".lora_down.weight").sizes().vec(), down) << name;
    EXPECT_EQ(m.at(name + ".lora_up.weight").sizes().vec(), up) << name;
    EXPECT_EQ(m.at(name + ".alpha").dim(), 0) << name;
    EXPECT_DOUBLE_EQ(m.at(name + ".alpha").item<double>(), alpha) << name;
  }
  // A few spelled out, as they appear in ComfyUI-loadable files.
  for (const char* k : {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                        "lora_unet_double_blocks_18_txt_mlp_2.lora_up.weight",
                        "lora_unet_single_blocks_0_linear1.alpha", "lora_unet_single_blocks_37_linear2.lora_down.weight"})
    EXPECT_TRUE(m.count(k)) << k;
  // diffusers names of the same adapters.
  const TensorMap d = export_lora(cfg, set, LoraFormat::Diffusers);
  for (const char* k : {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                        "transformer.transformer_blocks.18.attn.to_add_out.lora_B.weight",
                        "transformer.transformer_blocks.3.ff_context.net.0.proj.lora_A.weight",
                        "transformer.single_transformer_blocks.37.proj_out.lora_B.weight",
                        "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"})
    EXPECT_TRUE(d.count(k)) << k;
  EXPECT_EQ(d.size(), 2 * set.adapters().size());
}

// The stacking convention: downs concatenated along the rank, ups block-diagonal; the kohya
// module's delta (alpha/R) up @ down equals the sum of the adapters' scale * up @ down.
TEST(LoraFormat, KohyaStackingIsTheSameDelta) {
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const LoraSet set = standard_set(cfg, 8, 4.0, {"to_q", "to_k", "to_v", "proj_mlp"});
  const TensorMap m = export_lora(cfg, set, LoraFormat::Kohya);
  for (int blk : {0, static_cast<int>(cfg.depth)}) {
    const std::string linear = blk < cfg.depth ? "img_attn.qkv" : "linear1";
    const std::string name = kohya_module_name(cfg, blk, linear);
    const at::Tensor down = m.at(name + ".lora_down.weight").to(at::kDouble), up = m.at(name + ".lora_up.weight").to(at::kDouble);
    const double alpha = m.at(name + ".alpha").item<double>();
    const at::Tensor got = up.matmul(down) * (alpha / down.size(0));
    at::Tensor want = at::zeros({bfl_linear_out_features(cfg, linear), down.size(1)}, at::kDouble);
    for (const auto* a : set.find(blk, linear, -1))
      want.narrow(0, a->out_begin, a->out_end - a->out_begin).add_(a->up.to(at::kDouble).matmul(a->down.to(at::kDouble)) * a->scale);
    EXPECT_LT((got - want).abs().max().item<double>(), 1e-12) << name;
  }
}

TEST(LoraFormat, RoundTripsAreBitExact) {
  TempDir tmp;
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const LoraSet orig = standard_set(cfg, 8, 4.0);
  // diffusers -> kohya -> diffusers, and kohya -> diffusers -> kohya, through files.
  for (auto [first, second] : {std::pair{LoraFormat::Diffusers, LoraFormat::Kohya}, {LoraFormat::Kohya, LoraFormat::Diffusers}}) {
    save_lora_file(tmp.path("a.safetensors"), orig, first);
    EXPECT_EQ(lora_file_format(tmp.path("a.safetensors")), first);
    const LoraSet a = load_lora_file(tmp.path("a.safetensors"), cfg);
    expect_same_weights(a, orig);
    save_lora_file(tmp.path("b.safetensors"), a, second);
    const LoraSet b = load_lora_file(tmp.path("b.safetensors"), cfg);
    expect_same_weights(b, orig);
    save_lora_file(tmp.path("c.safetensors"), b, first);
    safetensors::File fa(tmp.path("a.safetensors")), fc(tmp.path("c.safetensors"));
    const TensorMap ta = fa.load_all(), tc = fc.load_all();
    ASSERT_EQ(ta.size(), tc.size());
    for (const auto& kv : ta) EXPECT_TRUE(at::equal(kv.second, tc.at(kv.first))) << kv.first;
  }
  // easycontrol <-> easycontrol (its only format).
  const LoraSet ec = easycontrol_set(cfg);
  save_lora_file(tmp.path("ec.safetensors"), ec, LoraFormat::EasyControl);
  expect_same_weights(load_lora_file(tmp.path("ec.safetensors"), cfg), ec);
}

// Files written by other tools carry no fluxtrain metadata: rank from the shapes, alpha from
// diffusers' lora_adapter_metadata or kohya's .alpha.
TEST(LoraFormat, ForeignFilesKeepAlpha) {
  TempDir tmp;
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const LoraSet orig = standard_set(cfg, 8, 4.0);
  for (LoraFormat f : {LoraFormat::Diffusers, LoraFormat::Kohya}) {
    save_lora_file(tmp.path("x.safetensors"), orig, f);
    safetensors::File in(tmp.path("x.safetensors"));
    std::map<std::string, std::string> md = in.metadata();
    md.erase("fluxtrain_lora");
    TensorMap t = in.load_all();
    for (auto& kv : t) kv.second = kv.second.clone();
    safetensors::save(tmp.path("foreign.safetensors"), t, md);
    const LoraSet back = load_lora_file(tmp.path("foreign.safetensors"), cfg);
    ASSERT_EQ(back.adapters().size(), orig.adapters().size()) << lora_format_name(f);
    for (const auto& a : back.adapters()) EXPECT_DOUBLE_EQ(a.scale, 0.5) << lora_format_name(f) << " " << a.key;
    expect_same_weights(back, orig);  // kohya: rank 8 from the unstacked modules, qkv/linear1 stacked
    if (f == LoraFormat::Diffusers) {
      const auto j = nlohmann::json::parse(md.at("lora_adapter_metadata"));
      EXPECT_EQ(j.at("transformer.r").get<int>(), 8);
      EXPECT_EQ(j.at("transformer.lora_alpha").get<double>(), 4.0);
    }
  }
  // A dense kohya module (sd-scripts' default: one rank-r LoRA on the fused qkv) reads as three
  // adapters sharing its down: the same delta.
  const int64_t H = cfg.hidden_size, r = 4;
  const at::Tensor down = at::randn({r, H}), up = at::randn({3 * H, r});
  TensorMap k{{"lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight", down},
              {"lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight", up},
              {"lora_unet_double_blocks_1_img_attn_qkv.alpha", at::scalar_tensor(2.0, at::kFloat)}};
  safetensors::save(tmp.path("dense.safetensors"), k, {});
  const LoraSet dense = load_lora_file(tmp.path("dense.safetensors"), cfg);
  const auto ads = dense.find(1, "img_attn.qkv", -1);
  ASSERT_EQ(ads.size(), 3u);
  for (const auto* a : ads) {
    EXPECT_DOUBLE_EQ(a->scale, 0.5);
    EXPECT_TRUE(at::equal(a->down, down));
    EXPECT_TRUE(at::equal(a->up, up.narrow(0, a->out_begin, H)));
  }
}

TEST(LoraFormat, ConditionLorasStayEasyControl) {
  TempDir tmp;
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const LoraSet ec = easycontrol_set(cfg);
  for (LoraFormat f : {LoraFormat::Kohya, LoraFormat::Diffusers}) {
    try {
      save_lora_file(tmp.path("x.safetensors"), ec, f);
      ADD_FAILURE() << "no error for " << lora_format_name(f);
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("condition tokens only"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(save_lora_file(tmp.path("y.safetensors"), standard_set(cfg, 4, 4), LoraFormat::EasyControl), Error);
  // --lora_format is checked before training starts.
  LoraConfig lc = ec.config();
  lc.formats = {"easycontrol", "kohya"};
  EXPECT_THROW(lc.validate(), Error);
  lc.formats = {"easycontrol"};
  EXPECT_NO_THROW(lc.validate());
  lc.formats = {"safetensors"};
  EXPECT_THROW(lc.validate(), Error);
}

TEST(LoraFormat, StrictOnForeignShapes) {
  TempDir tmp;
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const int64_t H = cfg.hidden_size;
  // A stacked qkv whose up is not block-diagonal cannot be three adapters of rank 2.
  LoraSet s = standard_set(cfg, 2, 2, {"to_q", "to_k", "to_v"}, {0});
  save_lora_file(tmp.path("ok.safetensors"), s, LoraFormat::Kohya);
  safetensors::File f(tmp.path("ok.safetensors"));
  TensorMap t = f.load_all();
  for (auto& kv : t) kv.second = kv.second.clone();
  t["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"][0][5].fill_(1.0);  // a row of q, a column of v's rank
  ASSERT_EQ(t["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].size(0), 3 * H);
  safetensors::save(tmp.path("bad.safetensors"), t, f.metadata());
  EXPECT_THROW(load_lora_file(tmp.path("bad.safetensors"), cfg), Error);
}

// Text encoders in kohya names: CLIP-L's and T5-XXL's real module lists, written by
// TextEncoderLora::kohya_state and read back by load_text_encoder_lora_file (alpha from .alpha).
TEST(LoraFormat, TextEncoderKohyaNames) {
  TempDir tmp;
  const ClipTextConfig clip = ClipTextConfig::clip_l();
  const T5EncoderConfig t5 = T5EncoderConfig::t5_xxl();
  TextEncoderLora c = TextEncoderLora::create(ClipTextModel::lora_targets(clip), 2, 3.0, 1);
  TextEncoderLora t = TextEncoderLora::create(T5Encoder::lora_targets(t5), 2, 5.0, 2);
  {
    at::NoGradGuard ng;
    for (auto* l : {&c, &t})
      for (auto& a : l->adapters()) a.B.copy_(at::randn(a.B.sizes()));
  }
  TensorMap m = c.kohya_state("lora_te1");
  for (auto& kv : t.kohya_state("lora_te3")) m.emplace(kv.first, kv.second);
  // kohya's rule: prefix + "_" + the module path with '.' -> '_'; 12 CLIP and 24 T5 layers, 4 each.
  EXPECT_EQ(m.size(), 3u * 4 * (12 + 24));
  for (const char* k : {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                        "lora_te1_text_model_encoder_layers_11_self_attn_out_proj.alpha",
                        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight",
                        "lora_te3_encoder_block_23_layer_0_SelfAttention_o.alpha"})
    EXPECT_TRUE(m.count(k)) << k;
  safetensors::save(tmp.path("te.safetensors"), m, {});
  const TextEncoderLoraFile back = load_text_encoder_lora_file(tmp.path("te.safetensors"), &clip, &t5);
  EXPECT_EQ(back.clip.alpha(), 3.0);
  EXPECT_EQ(back.t5.alpha(), 5.0);
  for (auto [x, y] : {std::pair{&c, &back.clip}, {&t, &back.t5}}) {
    ASSERT_EQ(x->adapters().size(), y->adapters().size());
    for (size_t i = 0; i < x->adapters().size(); ++i) {
      EXPECT_TRUE(at::equal(x->adapters()[i].A, y->adapters()[i].A)) << x->adapters()[i].target.module;
      EXPECT_TRUE(at::equal(x->adapters()[i].B, y->adapters()[i].B)) << x->adapters()[i].target.module;
    }
  }
}

}  // namespace
}  // namespace fluxtrain
