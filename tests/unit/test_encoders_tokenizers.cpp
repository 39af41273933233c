// Tokenizers: the real FLUX.1 tokenizer files reproduce transformers' ids on every fixture line
// (tests/data/tokenizers/expected_ids.jsonl, made by transformers from these files); bad files
// give one line naming the file. (tests/py/test_text_encoders.py covers hundreds more strings.)
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "encoders/clip_tokenizer.h"
#include "encoders/t5_tokenizer.h"
#include "support/test_util.h"

using namespace fluxtrain;

namespace {

const std::string kData = std::string(FLUXTRAIN_SOURCE_DIR) + "/tests/data/tokenizers";

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f << bytes;
}

// The message of the Error that fn throws ("" when it throws none).
template <class Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(EncodersTokenizers, FixtureIdsExact) {
  ClipTokenizer clip(kData + "/clip");
  T5Tokenizer t5(kData + "/t5");
  std::ifstream in(kData + "/expected_ids.jsonl");
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line);
    const std::string text = j.at("text");
    EXPECT_EQ(clip.encode(text, /*pad=*/false), j.at("clip").get<std::vector<int64_t>>()) << text;
    EXPECT_EQ(t5.encode(text, 512, /*pad=*/false), j.at("t5").get<std::vector<int64_t>>()) << text;
    ++n;
  }
  EXPECT_GT(n, 10);
}

TEST(EncodersTokenizers, PaddingAndTruncationAsFluxDoes) {
  ClipTokenizer clip(kData + "/clip");
  T5Tokenizer t5(kData + "/t5");
  auto c = clip.encode("a photo of a cat");
  ASSERT_EQ(c.size(), 77u);
  EXPECT_EQ(c[0], 49406);
  EXPECT_EQ(c[6], 49407);
  EXPECT_EQ(c[76], 49407);  // FLUX's CLIP tokenizer pads with <|endoftext|>
  std::string long_text;
  for (int i = 0; i < 300; ++i) long_text += "cat ";
  auto cl = clip.encode(long_text);
  ASSERT_EQ(cl.size(), 77u);
  EXPECT_EQ(cl[75], 2368);
  EXPECT_EQ(cl[76], 49407);
  auto tl = t5.encode(long_text, 16);
  ASSERT_EQ(tl.size(), 16u);
  EXPECT_EQ(tl[15], 1);  // </s> kept last after truncation
  auto ts = t5.encode("a cat", 8);
  EXPECT_EQ(ts, (std::vector<int64_t>{3, 9, 1712, 1, 0, 0, 0, 0}));
  auto e = clip.encode("", false);
  EXPECT_EQ(e, (std::vector<int64_t>{49406, 49407}));
  EXPECT_EQ(t5.encode("", 4), (std::vector<int64_t>{1, 0, 0, 0}));
}

TEST(EncodersTokenizers, ConfigFilesAreHonoured) {
  TempDir d;
  for (const char* f : {"vocab.json", "merges.txt"})
    write_file(d.path(f), read_text_file(kData + "/clip/" + f));
  write_file(d.path("tokenizer_config.json"), R"({"model_max_length": 10, "pad_token": "!"})");
  ClipTokenizer clip(d.dir());
  auto c = clip.encode("a photo of a cat");
  ASSERT_EQ(c.size(), 10u);
  EXPECT_EQ(c[7], 0);  // "!" is id 0
}

TEST(EncodersTokenizers, BadFilesGiveOneLineNamingTheFile) {
  TempDir d;
  // missing
  std::string m = error_of([&] { ClipTokenizer t(d.dir()); });
  EXPECT_NE(m.find("vocab.json: missing"), std::string::npos) << m;
  m = error_of([&] { T5Tokenizer t(d.dir()); });
  EXPECT_NE(m.find("spiece.model: missing"), std::string::npos) << m;
  // truncated vocab
  const std::string vocab = read_text_file(kData + "/clip/vocab.json");
  write_file(d.path("vocab.json"), vocab.substr(0, vocab.size() / 2));
  write_file(d.path("merges.txt"), read_text_file(kData + "/clip/merges.txt"));
  m = error_of([&] { ClipTokenizer t(d.dir()); });
  EXPECT_NE(m.find(d.path("vocab.json") + ": not valid JSON"), std::string::npos) << m;
  // wrong format merges
  write_file(d.path("vocab.json"), vocab);
  write_file(d.path("merges.txt"), "#version: 0.2\na b\nthis line has three\n");
  m = error_of([&] { ClipTokenizer t(d.dir()); });
  EXPECT_NE(m.find(d.path("merges.txt") + ":3: expected two tokens"), std::string::npos) << m;
  // vocab that is JSON but not a vocabulary
  write_file(d.path("vocab.json"), "[1, 2, 3]");
  m = error_of([&] { ClipTokenizer t(d.dir()); });
  EXPECT_NE(m.find("expected a JSON object"), std::string::npos) << m;
  // truncated / wrong-format SentencePiece model
  const std::string sp = read_text_file(kData + "/t5/spiece.model");
  write_file(d.path("spiece.model"), sp.substr(0, sp.size() / 3));
  m = error_of([&] { T5Tokenizer t(d.dir()); });
  EXPECT_NE(m.find(d.path("spiece.model") + ": not a SentencePiece model"), std::string::npos) << m;
  write_file(d.path("spiece.model"), "hello, I am a text file\n");
  m = error_of([&] { T5Tokenizer t(d.dir()); });
  EXPECT_NE(m.find("not a SentencePiece model"), std::string::npos) << m;
  for (const std::string& msg : {m}) EXPECT_EQ(msg.find('\n'), std::string::npos);
}
