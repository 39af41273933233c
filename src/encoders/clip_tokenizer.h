// CLIP's byte-level BPE tokenizer (the text side of CLIP ViT-L/14, FLUX's tokenizer/), built
// from vocab.json + merges.txt and following transformers' CLIPTokenizer:
//   text -> special tokens (<|startoftext|>, <|endoftext|>) split off as they appear
//        -> NFC, every run of Unicode whitespace -> one space, lower-case (ICU)
//        -> CLIP's pre-tokenisation pattern (PCRE2, Unicode classes)
//        -> bytes mapped to printable characters -> BPE with "</w>" ending each word
//        -> [BOS] ids[:max_length-2] [EOS], padded to max_length with the pad token.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace fluxtrain {

class ClipTokenizer {
 public:
  // dir holds vocab.json and merges.txt; tokenizer_config.json and special_tokens_map.json are
  // read when present (bos/eos/unk/pad tokens, model_max_length). Bad files throw Error naming them.
  explicit ClipTokenizer(const std::string& dir);
  ~ClipTokenizer();
  ClipTokenizer(const ClipTokenizer&) = delete;
  ClipTokenizer& operator=(const ClipTokenizer&) = delete;

  // Ids with BOS/EOS, truncated to max_length(); padded to max_length() when pad is true.
  std::vector<int64_t> encode(const std::string& text, bool pad = true) const;
  // Ids of the text alone (no BOS/EOS, no truncation).
  std::vector<int64_t> tokenize(const std::string& text) const;

  int64_t max_length() const { return max_length_; }
  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  int64_t vocab_size() const { return static_cast<int64_t>(vocab_.size()); }

 private:
  struct Regex;
  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<std::string, int64_t> merge_rank_;  // "left right" -> rank
  std::string byte_char_[256];                           // byte -> its printable UTF-8 stand-in
  std::string bos_, eos_, unk_, pad_;
  int64_t bos_id_ = 0, eos_id_ = 0, unk_id_ = 0, pad_id_ = 0, max_length_ = 77;
  std::unique_ptr<Regex> split_, spaces_;

  void bpe_word(const std::string& piece, std::vector<int64_t>& out) const;
  void tokenize_plain(const std::string& text, std::vector<int64_t>& out) const;
};

// UTF-8 -> NFC -> whitespace runs to one space -> per-character Unicode lower case.
// (Exposed for tests.)
std::string clip_normalize(const std::string& text);

}  // namespace fluxtrain
