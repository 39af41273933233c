// Weight files: both layouts written by init-model load to identical weights; strict loading;
// every bad-input path of `fluxtrain forward` fails with one line and writes nothing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <tuple>

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "model/block_weights.h"
#include "model/flux_weights.h"
#include "support/test_util.h"

using namespace fluxtrain;

namespace {
std::string bin() { return FLUXTRAIN_BIN; }
std::string py_inputs(const std::string& out) {
  return std::string(FLUXTRAIN_SOURCE_DIR) + "/tests/py/make_forward_inputs.py " + out;
}
}  // namespace

TEST(Weights, BflAndDiffusersLayoutsLoadIdentically) {
  TempDir d;
  ASSERT_EQ(run_command(bin() + " init-model --size tiny --output_dir " + d.path("m") + " --max_shard_size_mb 0.1"), 0);
  auto bfl = load_transformer(d.path("m"), "bfl");
  auto dif = load_transformer(d.path("m"), "diffusers");
  EXPECT_EQ(bfl.layout, "bfl");
  EXPECT_EQ(dif.layout, "diffusers");
  EXPECT_TRUE(bfl.config == dif.config);
  ASSERT_EQ(bfl.weights.size(), dif.weights.size());
  for (const auto& kv : bfl.weights) EXPECT_TRUE(at::equal(kv.second, dif.weights.at(kv.first))) << kv.first;
  // and they are the weights init-model drew
  TensorMap fresh = init_random_weights(FluxConfig::preset("tiny"), 0, at::kFloat);
  for (const auto& kv : fresh) EXPECT_TRUE(at::equal(kv.second, bfl.weights.at(kv.first))) << kv.first;
  // several shards were written and listed in the index
  int shards = 0;
  for (const auto& name : list_directory(d.path("m/transformer"))) shards += file_extension(name) == ".safetensors";
  EXPECT_GT(shards, 1);
}

TEST(Weights, SchnellHasNoGuidanceEmbedding) {
  auto shapes = flux_weight_shapes(FluxConfig::preset("flux-schnell"));
  for (const auto& s : shapes) EXPECT_EQ(s.first.find("guidance_in"), std::string::npos);
  auto dev = flux_weight_shapes(FluxConfig::preset("flux-dev"));
  EXPECT_EQ(dev.size(), shapes.size() + 4);
  // FLUX.1-dev parameter count: 11.9 B
  double n = 0;
  for (const auto& s : dev) {
    double k = 1;
    for (auto v : s.second) k *= v;
    n += k;
  }
  EXPECT_NEAR(n / 1e9, 11.9, 0.05);
}

// Each case damages the model in one way; forward must exit 2 with one line naming the file
// (and key), and must not create the output.
TEST(Weights, BadModelFilesFailCleanly) {
  TempDir d;
  const std::string model = d.path("m");
  ASSERT_EQ(run_command(bin() + " init-model --size tiny --layout bfl --output_dir " + model), 0);
  const std::string inputs = d.path("in.safetensors");
  ASSERT_EQ(run_command("python3 " + py_inputs(inputs)), 0) << "needs python3 with torch+safetensors";
  const std::string file = model + "/flux1-dev.safetensors";
  const std::string good = read_text_file(file);
  const std::string out = d.path("out.safetensors");
  auto forward = [&](const std::string& src) {
    std::string o;
    int rc = run_command(bin() + " forward --pretrained_model_name_or_path " + src + " --inputs " + inputs +
                             " --output " + out + " 2>&1",
                         &o);
    return std::make_pair(rc, o);
  };
  ASSERT_EQ(forward(model).first, 0);
  std::remove(out.c_str());

  auto write = [&](const std::string& bytes) {
    std::ofstream f(file, std::ios::binary | std::ios::trunc);
    f << bytes;
  };
  uint64_t hlen = 0;
  std::memcpy(&hlen, good.data(), 8);
  std::string header = good.substr(8, hlen);
  auto with_header = [&](std::string h) {
    while (h.size() < hlen) h.push_back(' ');
    return good.substr(0, 8) + h.substr(0, hlen) + good.substr(8 + hlen);
  };
  auto replace = [&](std::string s, const std::string& a, const std::string& b) {
    auto p = s.find(a);
    EXPECT_NE(p, std::string::npos) << a;
    return s.replace(p, a.size(), b);
  };
  struct Case {
    std::string name, bytes, needle;
  };
  std::string past = good;
  uint64_t big = good.size() * 2;
  std::memcpy(past.data(), &big, 8);
  // the first tensor's offsets pushed past the data section
  std::string off_hdr = header;
  {
    // the last tensor's offsets (the largest numbers) turned into 9s of the same length
    auto p = off_hdr.rfind("\"data_offsets\":[") + 16;
    auto q = off_hdr.find(']', p);
    for (auto i = p; i < q; ++i)
      if (off_hdr[i] != ',') off_hdr[i] = '9';
  }
  std::vector<Case> cases = {
      {"truncated", good.substr(0, good.size() / 2), "data_offsets"},
      {"tiny file", good.substr(0, 5), "truncated"},
      {"header past end", past, "past the end"},
      {"offsets out of range", with_header(off_hdr), "out of range"},
      {"unknown dtype", with_header(replace(header, "\"F32\"", "\"X32\"")), "unknown dtype X32"},
      {"missing key", with_header(replace(header, "\"txt_in.bias\"", "\"txt_in.bias_\"")), "txt_in.bias"},
  };
  for (const auto& c : cases) {
    write(c.bytes);
    auto [rc, o] = forward(model);
    EXPECT_EQ(rc, 2) << c.name << ": " << o;
    EXPECT_NE(o.find("flux1-dev.safetensors"), std::string::npos) << c.name << ": " << o;
    EXPECT_NE(o.find(c.needle), std::string::npos) << c.name << ": " << o;
    EXPECT_EQ(std::count(o.begin(), o.end(), '\n'), 1) << c.name << ": " << o;
    EXPECT_FALSE(path_exists(out)) << c.name;
  }
  // wrong shape: a valid file whose img_in.weight has the wrong shape
  write(good);
  {
    TensorMap w = safetensors::File(file).load_all();
    w["img_in.weight"] = at::zeros({64, 32});
    safetensors::save(file, w, {{"fluxtrain_config", safetensors::File(file).metadata().at("fluxtrain_config")}});
    auto [rc, o] = forward(model);
    EXPECT_EQ(rc, 2) << o;
    EXPECT_NE(o.find("img_in.weight: expected shape [64, 64], found [64, 32]"), std::string::npos) << o;
    EXPECT_FALSE(path_exists(out));
  }
  // a directory with neither layout
  make_directories(d.path("empty"));
  auto [rc, o] = forward(d.path("empty"));
  EXPECT_EQ(rc, 2);
  EXPECT_NE(o.find("neither a BFL checkpoint"), std::string::npos) << o;
  EXPECT_FALSE(path_exists(out));
}

// ---- TransformerSource: the block-by-block reader behind load_transformer ----

namespace {

// Same dtype, shape and bytes (at::equal would call -0 and +0 equal).
bool bits_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  return at::equal(a.contiguous().reshape({-1}).view(at::kByte), b.contiguous().reshape({-1}).view(at::kByte));
}

// A tiny snapshot in both layouts, the diffusers one in several shards.
const std::string& tiny_snapshot() {
  static TempDir d;
  static const std::string m = [] {
    const std::string p = d.path("m");
    EXPECT_EQ(run_command(bin() + " init-model --size tiny --output_dir " + p + " --max_shard_size_mb 0.1"), 0);
    return p;
  }();
  return m;
}

std::string what_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

class SourceLayouts : public ::testing::TestWithParam<std::tuple<std::string, at::ScalarType>> {};

// block(i) and globals() are the parts ResidentBlockWeights makes of load_transformer's map,
// bit for bit, and the weights init-model drew (cast like the loader casts).
TEST_P(SourceLayouts, BlocksAndGlobalsEqualTheWholeModel) {
  const auto [layout, dtype] = GetParam();
  TransformerSource src = open_transformer(tiny_snapshot(), layout, dtype);
  LoadedTransformer lt = load_transformer(tiny_snapshot(), layout, dtype);
  EXPECT_EQ(src.layout, layout);
  EXPECT_EQ(src.source, lt.source);
  EXPECT_TRUE(src.config == lt.config);
  const FluxConfig& c = src.config;
  ASSERT_EQ(src.num_blocks(), c.depth + c.depth_single);
  ResidentBlockWeights parts(lt.weights, c.depth, c.depth_single);

  TensorMap fresh = init_random_weights(FluxConfig::preset("tiny"), 0, at::kFloat);
  auto oracle = [&](const std::string& full) {
    const at::Tensor& t = fresh.at(full);
    return dtype == at::ScalarType::Undefined ? t : t.to(dtype);
  };
  const at::ScalarType want_dtype = dtype == at::ScalarType::Undefined ? at::kFloat : dtype;

  size_t seen = 0;
  TensorMap g = src.globals();
  ASSERT_EQ(g.size(), parts.globals().size());
  for (const auto& [name, t] : g) {
    ASSERT_TRUE(parts.globals().count(name)) << name;
    EXPECT_EQ(t.scalar_type(), want_dtype) << name;
    EXPECT_TRUE(bits_equal(t, parts.globals().at(name))) << name;
    EXPECT_TRUE(bits_equal(t, oracle(name))) << name;
  }
  seen += g.size();
  for (int i = 0; i < src.num_blocks(); ++i) {
    TensorMap b = src.block(i);
    const TensorMap& want = parts.acquire(i);
    ASSERT_EQ(b.size(), want.size()) << "block " << i;
    for (const auto& [name, t] : b) {
      ASSERT_TRUE(want.count(name)) << "block " << i << ": " << name;
      EXPECT_TRUE(bits_equal(t, want.at(name))) << "block " << i << ": " << name;
      EXPECT_TRUE(bits_equal(t, oracle(block_prefix(i, c.depth) + name))) << "block " << i << ": " << name;
    }
    seen += b.size();
  }
  EXPECT_EQ(seen, lt.weights.size());
  EXPECT_EQ(seen, flux_weight_shapes(c).size());
  // any order, any number of times
  EXPECT_TRUE(bits_equal(src.block(1).at("img_attn.qkv.weight"), parts.acquire(1).at("img_attn.qkv.weight")));
  EXPECT_NE(what_of([&] { src.block(src.num_blocks()); }).find("does not exist"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Weights, SourceLayouts,
                         ::testing::Combine(::testing::Values("bfl", "diffusers"),
                                            ::testing::Values(at::ScalarType::Undefined, at::kBFloat16)),
                         [](const auto& info) {
                           return std::get<0>(info.param) +
                                  (std::get<1>(info.param) == at::ScalarType::Undefined ? "_file_dtype" : "_bf16");
                         });

// The tensors are copies: they stay valid when the source and its mappings are gone.
// (safetensors::File::load copies out of the mapping; there is no zero-copy view to test.)
TEST(Weights, SourceTensorsOutliveTheSource) {
  TensorMap b;
  {
    TransformerSource src = open_transformer(tiny_snapshot(), "bfl");
    b = src.block(0);
  }
  TensorMap fresh = init_random_weights(FluxConfig::preset("tiny"), 0, at::kFloat);
  EXPECT_TRUE(bits_equal(b.at("img_attn.qkv.weight"), fresh.at("double_blocks.0.img_attn.qkv.weight")));
}

// Bad keys are found when the files are opened (headers only), even in the last block, with
// the one-line error load_transformer gives.
TEST(Weights, SourceReportsBadKeysAtOpen) {
  TempDir d;
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const std::string last = "single_blocks." + std::to_string(cfg.depth_single - 1) + ".";
  const std::string last_diff = "single_transformer_blocks." + std::to_string(cfg.depth_single - 1) + ".";
  TensorMap bfl = load_transformer(tiny_snapshot(), "bfl").weights;
  TensorMap diff = bfl_to_diffusers(cfg, bfl);
  const std::string cfg_json = read_text_file(tiny_snapshot() + "/transformer/config.json");
  struct Case {
    std::string name, layout, needle;
    std::function<void(TensorMap&)> damage;
  };
  std::vector<Case> cases = {
      {"bfl missing", "bfl", ": missing key " + last + "linear2.bias (expected shape [64])",
       [&](TensorMap& w) { w.erase(last + "linear2.bias"); }},
      {"bfl misshaped", "bfl", ": key " + last + "linear1.weight: expected shape [448, 64], found [448, 32]",
       [&](TensorMap& w) { w[last + "linear1.weight"] = at::zeros({448, 32}); }},
      {"bfl unexpected", "bfl", ": unexpected key " + last + "extra",
       [&](TensorMap& w) { w[last + "extra"] = at::zeros({1}); }},
      {"diffusers missing", "diffusers", ": missing key " + last_diff + "proj_mlp.bias",
       [&](TensorMap& w) { w.erase(last_diff + "proj_mlp.bias"); }},
      {"diffusers misshaped", "diffusers",
       ": key " + last_diff + "attn.to_k.weight: expected shape [64, 64], found [64, 32]",
       [&](TensorMap& w) { w[last_diff + "attn.to_k.weight"] = at::zeros({64, 32}); }},
      {"diffusers unexpected", "diffusers", ": unexpected key " + last_diff + "extra",
       [&](TensorMap& w) { w[last_diff + "extra"] = at::zeros({1}); }},
  };
  int n = 0;
  for (const auto& c : cases) {
    const std::string dir = d.path("case" + std::to_string(n++));
    make_directories(dir);
    std::string file;
    if (c.layout == "bfl") {
      TensorMap w = bfl;
      c.damage(w);
      file = path_join(dir, "flux1-dev.safetensors");
      safetensors::save(file, w, {{"fluxtrain_config", cfg.to_diffusers_json().dump()}});
    } else {
      TensorMap w = diff;
      c.damage(w);
      file = dir;
      safetensors::save(path_join(dir, "diffusion_pytorch_model.safetensors"), w);
      write_text_file_atomic(path_join(dir, "config.json"), cfg_json);
    }
    const std::string opened = what_of([&] { open_transformer(dir, c.layout); });
    EXPECT_EQ(opened, what_of([&] { load_transformer(dir, c.layout); })) << c.name;
    EXPECT_EQ(opened.rfind("loading transformer: " + file + c.needle, 0), 0u) << c.name << ": " << opened;
    EXPECT_EQ(opened.find('\n'), std::string::npos) << c.name << ": " << opened;
  }
}
