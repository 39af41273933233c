// libFuzzer target: the CLIP BPE tokenizer (ICU normalisation, PCRE2 pre-tokenisation, BPE) and
// the T5 SentencePiece tokenizer (special tokens written in the text) on arbitrary bytes, valid
// UTF-8 or not. The tokenizer files (tests/data/tokenizers) are loaded once. Besides crashes,
// every id must lie in the vocabulary and lengths must follow the padding/truncation rules.
#include <cstdlib>
#include <memory>

#include "encoders/clip_tokenizer.h"
#include "encoders/t5_tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

#ifndef FLUXTRAIN_SOURCE_DIR
#error "FLUXTRAIN_SOURCE_DIR must name the source tree (tests/data/tokenizers)"
#endif

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fluxtrain;
  static const auto clip = std::make_unique<ClipTokenizer>(FLUXTRAIN_SOURCE_DIR "/tests/data/tokenizers/clip");
  static const auto t5 = std::make_unique<T5Tokenizer>(FLUXTRAIN_SOURCE_DIR "/tests/data/tokenizers/t5");
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto in_vocab = [](const std::vector<int64_t>& ids, int64_t n) {
    for (int64_t id : ids)
      if (id < 0 || id >= n) std::abort();
  };
  fuzz::expect_clean([&] {
    const std::vector<int64_t> c = clip->encode(text);
    if (static_cast<int64_t>(c.size()) != clip->max_length() || c.front() != clip->bos_id()) std::abort();
    in_vocab(c, clip->vocab_size());
    in_vocab(clip->tokenize(text), clip->vocab_size());
  });
  fuzz::expect_clean([&] {
    const std::vector<int64_t> t = t5->encode(text, 64);
    if (t.size() != 64) std::abort();
    in_vocab(t, t5->vocab_size());
    in_vocab(t5->tokenize(text), t5->vocab_size());
  });
  return 0;
}
