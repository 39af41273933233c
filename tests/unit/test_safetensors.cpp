// safetensors reader/writer: bit-exact round trip, every validation path, atomic writes.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "support/test_util.h"

using namespace fluxtrain;

TEST(Safetensors, RoundTripIsBitExactForEveryDtype) {
  TempDir dir;
  TensorMap t;
  t["a.f32"] = at::randn({3, 5});
  t["b.f64"] = at::randn({7}, at::kDouble);
  t["c.bf16"] = at::randn({2, 3, 4}).to(at::kBFloat16);
  t["d.f16"] = at::randn({4, 1}).to(at::kHalf);
  t["e.i64"] = at::arange(10, at::kLong);
  t["f.f8"] = at::randn({6}).to(at::kFloat8_e4m3fn);
  t["g.empty"] = at::empty({0, 4});
  t["h.scalar"] = at::full({}, 3.5);
  const std::string p = dir.path("x.safetensors");
  safetensors::save(p, t, {{"k", "v"}});
  safetensors::File f(p);
  EXPECT_EQ(f.metadata().at("k"), "v");
  ASSERT_EQ(f.entries().size(), t.size());
  for (const auto& kv : t) {
    at::Tensor back = f.load(kv.first);
    EXPECT_EQ(back.scalar_type(), kv.second.scalar_type()) << kv.first;
    EXPECT_EQ(back.sizes(), kv.second.sizes()) << kv.first;
    // Compare raw bytes: bit-exact, NaN-safe.
    ASSERT_EQ(back.nbytes(), kv.second.nbytes());
    EXPECT_EQ(0, std::memcmp(back.data_ptr(), kv.second.contiguous().data_ptr(), back.nbytes())) << kv.first;
  }
  EXPECT_FALSE(path_exists(temp_path_for(p)));
}

namespace {
// Writes a file with the given raw header JSON and data bytes.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes, int64_t len_override = -1) {
  std::ofstream o(path, std::ios::binary);
  uint64_t n = len_override >= 0 ? static_cast<uint64_t>(len_override) : header.size();
  o.write(reinterpret_cast<const char*>(&n), 8);
  o << header;
  std::string data(data_bytes, '\0');
  o << data;
}
}  // namespace

TEST(Safetensors, RejectsBadFilesWithOneLineNamingFileAndKey) {
  TempDir dir;
  const std::string p = dir.path("bad.safetensors");
  auto expect_error = [&](const std::string& needle) {
    try {
      safetensors::File f(p);
      FAIL() << "no error for " << needle;
    } catch (const Error& e) {
      std::string m = e.what();
      EXPECT_NE(m.find(p), std::string::npos) << m;
      EXPECT_NE(m.find(needle), std::string::npos) << m;
      EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    }
  };
  { std::ofstream o(p, std::ios::binary); o << "abc"; }
  expect_error("truncated");
  write_raw(p, R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8, 1 << 20);
  expect_error("past the end");
  write_raw(p, R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", 8);
  expect_error("tensor w: data_offsets");
  write_raw(p, R"({"w":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", 8);
  expect_error("unknown dtype Q7");
  write_raw(p, R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8);
  expect_error("tensor w");
  write_raw(p, R"({"w":{"dtype":"F32","shape":[2]})", 8);
  expect_error("not valid JSON");
  expect_error("bad.safetensors");
}

TEST(Safetensors, FailedWriteLeavesExistingFileUntouched) {
  TempDir dir;
  const std::string p = dir.path("keep.safetensors");
  safetensors::save(p, {{"a", at::ones({2})}});
  const std::string before = read_text_file(p);
  TensorMap bad{{"a", at::ones({2})}, {"z", at::ones({2}, at::kComplexFloat)}};  // complex: not storable
  EXPECT_THROW(safetensors::save(p, bad), Error);
  EXPECT_EQ(read_text_file(p), before);
  EXPECT_FALSE(path_exists(temp_path_for(p)));
}
