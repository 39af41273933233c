// HDF5 helpers, the dataset writer/reader, the data order and the prefetcher, and the one-line
// errors for missing, corrupt, truncated, empty and mismatched datasets.
#include <gtest/gtest.h>

#include <unistd.h>

#include <fstream>
#include <set>

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/hdf5_io.h"
#include "data/dataset.h"
#include "data/synth_data.h"
#include "model/flux_config.h"
#include "core/rng.h"
#include "support/test_util.h"

namespace fluxtrain {
namespace {

// Runs f, expects an Error whose message is one line containing `needle`.
template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << needle << "'";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(needle), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << "not one line: " << m;
  }
}

SynthSpec small_spec() {
  SynthSpec s;
  s.num_samples = 10;
  s.sizes = {8, 4};  // variable target sizes
  s.cond_latent_size = 6;
  s.num_conditions = 2;
  s.cond_kind = "subject";
  s.text_len = 5;
  s.latent_dtype = at::kFloat;
  s.embed_dtype = at::kBFloat16;
  return s;
}

TEST(Hdf5Io, TensorsStringsAndAttributesRoundTrip) {
  TempDir tmp;
  const std::string path = tmp.path("x.h5");
  auto gen = cpu_generator(1);
  std::map<std::string, at::Tensor> ts = {
      {"f32", at::randn({5, 3}, gen)},
      {"f64", at::randn({2, 3, 4}, gen, at::kDouble)},
      {"bf16", at::randn({300, 7}, gen).to(at::kBFloat16)},  // several chunks
      {"f16", at::randn({4}, gen).to(at::kHalf)},
      {"i64", at::arange(10, at::kLong).view({2, 5})},
      {"i32", at::arange(6, at::kInt)},
      {"u8", at::arange(6, at::kByte)},
      {"scalar", at::tensor(3.5, at::kDouble)},
      {"empty", at::empty({0, 3})},
  };
  {
    h5::File f = h5::File::create(path);
    h5::WriteOptions small;
    small.chunk_bytes = 256;
    for (const auto& kv : ts) f.write_tensor(kv.first, kv.second, small);
    f.write_strings("s", {"a", "", "\xc3\xa9t\xc3\xa9 ok"});
    f.write_strings("none", {});
    h5::Location g = f.create_group("g");
    g.set_attr("i", int64_t{-7});
    g.set_attr("d", 0.25);
    g.set_attr("s", std::string("hello"));
    g.set_attr("v", std::vector<int64_t>{1, 2, 3});
    h5::Appendable app(g, "app", at::kFloat, {2}, 3);
    app.append(at::ones({2, 2}));
    app.append(at::zeros({3, 2}));
    EXPECT_EQ(app.rows(), 5);
  }
  h5::File f = h5::File::open(path);
  for (const auto& kv : ts) {
    at::Tensor r = f.read_tensor(kv.first);
    EXPECT_EQ(r.scalar_type(), kv.second.scalar_type()) << kv.first;
    EXPECT_TRUE(at::equal(r, kv.second)) << kv.first;
  }
  EXPECT_TRUE(at::equal(f.read_rows("bf16", 100, 50), ts["bf16"].narrow(0, 100, 50)));
  EXPECT_EQ(f.read_strings("s"), (std::vector<std::string>{"a", "", "\xc3\xa9t\xc3\xa9 ok"}));
  EXPECT_TRUE(f.read_strings("none").empty());
  h5::Location g = f.group("g");
  EXPECT_EQ(g.attr_int("i"), -7);
  EXPECT_EQ(g.attr_double("d"), 0.25);
  EXPECT_EQ(g.attr_string("s"), "hello");
  EXPECT_EQ(g.attr_ints("v"), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_TRUE(at::equal(g.read_tensor("app"), at::cat({at::ones({2, 2}), at::zeros({3, 2})})));
  EXPECT_TRUE(f.has("g/app"));
  EXPECT_FALSE(f.has("g/nope"));
  EXPECT_FALSE(f.has("nope/deeper"));
  expect_error([&] { f.read_tensor("missing"); }, "x.h5: /missing: missing dataset");
  expect_error([&] { f.read_rows("f32", 4, 2); }, "out of range");
  expect_error([&] { g.attr_int("s"); }, "not an integer");
}

TEST(Dataset, WriteReadRoundTripWithVariableSizesAndConditions) {
  TempDir tmp;
  const std::string path = tmp.path("d.h5");
  const SynthSpec s = small_spec();
  write_synthetic_dataset(path, s);
  EXPECT_FALSE(path_exists(path + ".tmp." + std::to_string(::getpid())));
  Dataset ds(path);
  const DatasetInfo& info = ds.info();
  EXPECT_EQ(info.num_samples, 10);
  EXPECT_EQ(info.latent_channels, 16);
  EXPECT_EQ(info.text_len, 5);
  EXPECT_EQ(info.text_dim, 32);
  EXPECT_EQ(info.pooled_dim, 16);
  EXPECT_EQ(info.cond_kinds, (std::vector<std::string>{"subject", "subject"}));
  EXPECT_EQ(info.embed_dtype, "bfloat16");
  EXPECT_EQ(info.max_target_hw, 8);
  EXPECT_EQ(info.max_cond_hw, 6);
  for (int64_t i : {0, 1, 7}) {
    const Sample want = synthetic_sample(s, i);
    const Sample got = ds.read(i);
    EXPECT_EQ(got.index, i);
    EXPECT_TRUE(at::equal(got.target, want.target)) << i;
    ASSERT_EQ(got.conds.size(), 2u);
    EXPECT_TRUE(at::equal(got.conds[1], want.conds[1])) << i;
    EXPECT_TRUE(at::equal(got.t5, want.t5)) << i;
    EXPECT_EQ(got.t5.scalar_type(), at::kBFloat16);
    EXPECT_TRUE(at::equal(got.pooled, want.pooled)) << i;
    EXPECT_EQ(got.caption, want.caption);
    EXPECT_EQ(got.target_path, want.target_path);
    EXPECT_EQ(got.cond_paths, want.cond_paths);
  }
  EXPECT_EQ(ds.read(1).target.sizes(), (std::vector<int64_t>{16, 4, 4}));
  EXPECT_EQ(ds.read(2).target.sizes(), (std::vector<int64_t>{16, 8, 8}));
}

TEST(SyntheticData, ConditionPredictsTheTarget) {
  SynthSpec s;
  s.num_conditions = 1;
  s.sizes = {8};
  s.cond_latent_size = 8;
  s.target_scale = 2.0;
  // Every sample's target is the same signed channel permutation of its condition.
  const Sample a = synthetic_sample(s, 0), b = synthetic_sample(s, 5);
  for (const Sample* x : {&a, &b}) {
    EXPECT_NEAR(x->conds[0].std().item<double>(), 1.0, 1e-5);
    int matched = 0;
    for (int64_t c = 0; c < 16; ++c)
      for (int64_t k = 0; k < 16; ++k)
        for (double sign : {-2.0, 2.0})
          if (at::allclose(x->target[c], sign * x->conds[0][k], 1e-5, 1e-5)) ++matched;
    EXPECT_EQ(matched, 16);
  }
  EXPECT_FALSE(at::equal(a.conds[0], b.conds[0]));
}

TEST(DataOrder, EpochPermutationsSplitDisjointlyOverRanks) {
  const int64_t n = 23, batch = 2;
  const int world = 3;
  std::vector<DataOrder> ranks;
  for (int r = 0; r < world; ++r) ranks.emplace_back(n, batch, r, world, 42);
  EXPECT_EQ(ranks[0].micro_batches_per_epoch(), 3);  // 23 / (2*3), the partial global batch dropped
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    const auto perm = ranks[0].permutation(epoch);
    EXPECT_EQ(std::set<int64_t>(perm.begin(), perm.end()).size(), static_cast<size_t>(n));
    std::vector<int64_t> seen;
    for (int64_t m = epoch * 3; m < epoch * 3 + 3; ++m) {
      EXPECT_EQ(ranks[0].epoch_of(m), epoch);
      for (int r = 0; r < world; ++r) {
        auto idx = ranks[r].indices(m);
        EXPECT_EQ(idx.size(), 2u);
        seen.insert(seen.end(), idx.begin(), idx.end());
      }
    }
    // Global micro-batches take the permutation in order, rank by rank.
    EXPECT_EQ(seen, std::vector<int64_t>(perm.begin(), perm.begin() + 18));
  }
  EXPECT_NE(ranks[0].permutation(0), ranks[0].permutation(1));
  EXPECT_EQ(DataOrder(n, batch, 0, 1, 42).permutation(2), ranks[1].permutation(2));  // seed + epoch only
  EXPECT_NE(DataOrder(n, batch, 0, 1, 43).permutation(2), ranks[1].permutation(2));
  expect_error([&] { DataOrder(5, 2, 0, 3, 1); }, "fewer than one global batch of 6");
}

TEST(Prefetcher, DeliversMicroBatchesInOrderFromAnyStart) {
  TempDir tmp;
  const std::string path = tmp.path("d.h5");
  write_synthetic_dataset(path, small_spec());
  Dataset ds(path);
  DataOrder order(ds.size(), 3, 0, 1, 7);
  for (int64_t start : {0, 4}) {
    Prefetcher p(ds, order, start, 2);
    for (int64_t m = start; m < start + 6; ++m) {
      Batch b = p.next();
      EXPECT_EQ(b.micro_batch, m);
      EXPECT_EQ(b.epoch, m / 3);
      std::vector<int64_t> idx;
      for (const auto& s : b.samples) idx.push_back(s.index);
      EXPECT_EQ(idx, order.indices(m));
    }
  }
}

TEST(DatasetErrors, MissingCorruptTruncatedEmptyAndForeignFiles) {
  TempDir tmp;
  expect_error([&] { Dataset d(tmp.path("nope.h5")); }, "nope.h5: no such file");
  {
    std::ofstream(tmp.path("garbage.h5")) << "this is not hdf5 at all";
    expect_error([&] { Dataset d(tmp.path("garbage.h5")); }, "garbage.h5: not an HDF5 file");
  }
  {
    const std::string good = tmp.path("good.h5");
    write_synthetic_dataset(good, small_spec());
    const std::string bytes = read_text_file(good);
    write_text_file_atomic(tmp.path("trunc.h5"), bytes.substr(0, bytes.size() / 2));
    expect_error([&] {
      Dataset d(tmp.path("trunc.h5"));
      for (int64_t i = 0; i < d.size(); ++i) d.read(i);
    }, "trunc.h5");
  }
  {
    DatasetSpec spec;
    spec.text_len = 4;
    spec.text_dim = 32;
    spec.pooled_dim = 16;
    DatasetWriter w(tmp.path("empty.h5"), spec);
    w.finish();
    expect_error([&] { Dataset d(tmp.path("empty.h5")); }, "empty.h5: dataset has no samples");
  }
  {
    h5::File f = h5::File::create(tmp.path("foreign.h5"));
    f.write_tensor("x", at::ones({3}));
  }
  expect_error([&] { Dataset d(tmp.path("foreign.h5")); }, "foreign.h5: not a fluxtrain dataset");
  {
    // A dataset whose index points past the data (a corrupt index).
    const std::string p = tmp.path("badindex.h5");
    write_synthetic_dataset(p, small_spec());
    h5::File f = h5::File::open(p, true);
    h5::Location g = f.group("target");
    g.write_tensor("offset", at::full({10}, 1000000, at::kLong));
  }
  expect_error([&] { Dataset d(tmp.path("badindex.h5")); }, "lies outside the data array");
}

TEST(DatasetErrors, ShapeMismatchWithTheModelOrOptions) {
  TempDir tmp;
  const std::string p = tmp.path("d.h5");
  write_synthetic_dataset(p, small_spec());
  Dataset ds(p);
  const FluxConfig tiny = FluxConfig::preset("tiny");
  ds.check_compatible(tiny, 2, 64, 48);  // fits exactly: 8*8 = 64, 6*8 = 48
  expect_error([&] { ds.check_compatible(tiny, 1, 64, 48); }, "has 2 condition column(s), but --lora_num is 1");
  expect_error([&] { ds.check_compatible(tiny, 2, 48, 48); }, "exceed --noise_size 48");
  expect_error([&] { ds.check_compatible(tiny, 2, 64, 32); }, "exceed --cond_size 32");
  FluxConfig other = tiny;
  other.context_in_dim = 4096;
  expect_error([&] { ds.check_compatible(other, 2, 64, 48); }, "T5 embeddings are 32 wide, the model expects 4096");
  other = tiny;
  other.vec_in_dim = 768;
  expect_error([&] { ds.check_compatible(other, 2, 64, 48); }, "CLIP pooled embeddings are 16 wide");
  other = tiny;
  other.in_channels = 128;
  expect_error([&] { ds.check_compatible(other, 2, 64, 48); }, "latents have 16 channels, the model expects 32");
}

}  // namespace
}  // namespace fluxtrain
