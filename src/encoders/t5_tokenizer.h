// T5 v1.1's tokenizer (FLUX's tokenizer_2/): SentencePiece on spiece.model, as transformers'
// T5Tokenizer: special tokens written in the text (</s>, <pad>, <unk>, <extra_id_N>) map to
// their ids, everything else goes through SentencePiece; </s> ends the sequence; truncated so
// that </s> stays last, padded with <pad> to max_length.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace fluxtrain {

class T5Tokenizer {
 public:
  // dir holds spiece.model; tokenizer_config.json / special_tokens_map.json honoured when present
  // (eos/pad/unk tokens, extra_ids). Bad files throw Error naming them.
  explicit T5Tokenizer(const std::string& dir);
  ~T5Tokenizer();
  T5Tokenizer(const T5Tokenizer&) = delete;
  T5Tokenizer& operator=(const T5Tokenizer&) = delete;

  // ids + </s>, truncated to max_length (</s> kept), padded to max_length when pad is true.
  std::vector<int64_t> encode(const std::string& text, int64_t max_length, bool pad = true) const;
  std::vector<int64_t> tokenize(const std::string& text) const;  // without </s>

  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  int64_t vocab_size() const;  // pieces + extra ids

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::vector<std::pair<std::string, int64_t>> specials_;  // longest first
  int64_t eos_id_ = 1, pad_id_ = 0, unk_id_ = 2, extra_ids_ = 100;
};

}  // namespace fluxtrain
