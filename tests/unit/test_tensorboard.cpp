// TensorBoard event files (core/tensorboard.h): CRC-32C against published check values, the
// TFRecord framing, and the records of a writer. Readers' view: tests/py/test_tensorboard.py.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <iterator>

#include "core/fs.h"
#include "core/tensorboard.h"
#include "support/test_util.h"

namespace fluxtrain {
namespace {

uint32_t read_u32(const std::string& s, size_t at) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(s[at + i]);
  return v;
}

uint64_t read_u64(const std::string& s, size_t at) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(s[at + i]);
  return v;
}

TEST(TensorBoard, Crc32cKnownValues) {
  // The CRC catalogue's check value for CRC-32/ISCSI, and RFC 3720's test patterns.
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
  const std::string zeros(32, '\0'), ones(32, '\xff');
  EXPECT_EQ(crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  EXPECT_EQ(crc32c(ones.data(), ones.size()), 0x62A8AB43u);
  std::string inc(32, '\0');
  for (int i = 0; i < 32; ++i) inc[i] = static_cast<char>(i);
  EXPECT_EQ(crc32c(inc.data(), inc.size()), 0x46DD794Eu);
  // TFRecord's mask: rotate right 15, add a constant.
  const uint32_t c = 0xE3069283u;
  EXPECT_EQ(masked_crc32c("123456789", 9), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST(TensorBoard, RecordFraming) {
  const std::string data = "hello event";
  const std::string r = tfrecord_frame(data);
  ASSERT_EQ(r.size(), 8 + 4 + data.size() + 4);
  EXPECT_EQ(read_u64(r, 0), data.size());
  EXPECT_EQ(read_u32(r, 8), masked_crc32c(r.data(), 8));
  EXPECT_EQ(r.substr(12, data.size()), data);
  EXPECT_EQ(read_u32(r, 12 + data.size()), masked_crc32c(data.data(), data.size()));
}

TEST(TensorBoard, WriterRecords) {
  if (!tensorboard_available()) GTEST_SKIP() << "built without protobuf";
  TempDir tmp;
  std::string path;
  {
    TensorBoardWriter w(tmp.dir());
    path = w.path();
    EXPECT_NE(path.find("/events.out.tfevents."), std::string::npos);
    w.add_scalars(1, {{"loss", 0.5}, {"lr", 1e-4}});
    w.add_image_png("img", 2, std::string("\x89PNG fake", 9), 1, 1, 3);
    // Records are flushed as written: a reader sees them while the writer is open.
    std::ifstream in(path, std::ios::binary);
    const std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    size_t at = 0;
    int records = 0;
    while (at + 12 <= s.size()) {
      const uint64_t n = read_u64(s, at);
      ASSERT_EQ(read_u32(s, at + 8), masked_crc32c(s.data() + at, 8));
      ASSERT_LE(at + 16 + n, s.size());
      ASSERT_EQ(read_u32(s, at + 12 + n), masked_crc32c(s.data() + at + 12, n));
      if (records == 0) EXPECT_NE(s.substr(at + 12, n).find("brain.Event:2"), std::string::npos);
      at += 16 + n;
      ++records;
    }
    EXPECT_EQ(at, s.size());
    EXPECT_EQ(records, 3);
  }
  // A second writer in the same second gets its own file.
  TensorBoardWriter w2(tmp.dir());
  EXPECT_NE(w2.path(), path);
  EXPECT_THROW(TensorBoardWriter(tmp.path("missing")), std::exception);
}

}  // namespace
}  // namespace fluxtrain
