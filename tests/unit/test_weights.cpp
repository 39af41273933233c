// Weight files: both layouts written by init-model load to identical weights; strict loading;
// every bad-input path of `fluxtrain forward` fails with one line and writes nothing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
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
