// Zero-copy loading (core/safetensors.h): a loaded tensor views the mapping, yet behaves like
// an owning copy -- writes stay private, a second load is independent, the view outlives the
// File -- and misaligned tensors are copied correctly.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>

#include <ATen/ATen.h>

#include "core/safetensors.h"
#include "support/test_util.h"

using namespace fluxtrain;

TEST(SafetensorsViews, FirstLoadIsAViewLaterLoadsAreIndependentCopies) {
  TempDir dir;
  const std::string path = dir.path("a.safetensors");
  at::Tensor w = at::randn({64, 1000}).to(at::kBFloat16);
  at::Tensor b = at::arange(7, at::kLong);
  safetensors::save(path, {{"w", w}, {"b", b}});
  at::Tensor v;
  {
    safetensors::File f(path);
    EXPECT_TRUE(f.is_view("w"));
    v = f.load("w");
    EXPECT_FALSE(f.is_view("w"));
    EXPECT_TRUE(at::equal(v, w));
    v.mul_(2);  // copy-on-write: private to this view
    at::Tensor again = f.load("w");
    EXPECT_NE(again.data_ptr(), v.data_ptr());
    EXPECT_TRUE(at::equal(again, w)) << "a later load must not see the view's writes";
    EXPECT_TRUE(at::equal(f.load("b"), b));
  }
  // The view outlives its File; the file itself is untouched.
  EXPECT_TRUE(at::equal(v, w * 2));
  EXPECT_TRUE(at::equal(safetensors::File(path).load("w"), w));
  v = at::Tensor();  // frees the view: its pages go back, the mapping is unmapped
  EXPECT_TRUE(at::equal(safetensors::load(path).at("w"), w));
}

TEST(SafetensorsViews, MisalignedTensorIsCopiedCorrectly) {
  // A hand-made file whose bf16 tensor starts at an odd byte of the data section.
  TempDir dir;
  const std::string path = dir.path("odd.safetensors");
  std::string header = R"({"pad":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                       R"("x":{"dtype":"BF16","shape":[3],"data_offsets":[1,7]}})";
  while ((header.size() + 8) % 8 != 0) header.push_back(' ');
  at::Tensor x = at::tensor({1.5, -2.0, 3.25}).to(at::kBFloat16);
  std::FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  uint64_t n = header.size();
  std::fwrite(&n, 8, 1, f);  // little-endian host
  std::fwrite(header.data(), 1, header.size(), f);
  const unsigned char pad = 9;
  std::fwrite(&pad, 1, 1, f);
  std::fwrite(x.data_ptr(), 2, 3, f);
  std::fclose(f);
  safetensors::File file(path);
  EXPECT_FALSE(file.is_view("x"));
  EXPECT_TRUE(at::equal(file.load("x"), x));
  EXPECT_EQ(file.load("pad").item<uint8_t>(), 9);
}
