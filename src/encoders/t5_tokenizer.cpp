#include "encoders/t5_tokenizer.h"

#include <sentencepiece_processor.h>

#include "core/error.h"
#include "core/fs.h"
#include "encoders/tokenizer_config.h"

namespace fluxtrain {

T5Tokenizer::T5Tokenizer(const std::string& dir) : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  const std::string path = path_join(dir, "spiece.model");
  if (!path_exists(path)) throw Error(path + ": missing (a T5 tokenizer folder needs spiece.model)");
  const auto status = sp_->Load(path);
  if (!status.ok())
    throw Error(path + ": not a SentencePiece model (truncated or wrong format?): " + status.ToString());
  TokenizerConfig cfg(dir);
  extra_ids_ = cfg.integer("extra_ids", 100);
  auto id_of = [&](const std::string& piece, const char* what) -> int64_t {
    const int id = sp_->PieceToId(piece);
    if (sp_->IsUnknown(id) && piece != sp_->IdToPiece(id))
      throw Error(path + ": the " + std::string(what) + " token '" + piece + "' is not one of the model's pieces");
    return id;
  };
  eos_id_ = id_of(cfg.token("eos_token", "</s>"), "EOS");
  pad_id_ = id_of(cfg.token("pad_token", "<pad>"), "padding");
  unk_id_ = id_of(cfg.token("unk_token", "<unk>"), "unknown");
  specials_ = {{sp_->IdToPiece(static_cast<int>(eos_id_)), eos_id_},
               {sp_->IdToPiece(static_cast<int>(pad_id_)), pad_id_},
               {sp_->IdToPiece(static_cast<int>(unk_id_)), unk_id_}};
  // Sentinels <extra_id_0> .. <extra_id_{n-1}> follow the pieces in reverse order (T5's convention).
  const int64_t pieces = sp_->GetPieceSize();
  for (int64_t i = 0; i < extra_ids_; ++i)
    specials_.emplace_back("<extra_id_" + std::to_string(i) + ">", pieces + extra_ids_ - 1 - i);
}

T5Tokenizer::~T5Tokenizer() = default;

int64_t T5Tokenizer::vocab_size() const { return sp_->GetPieceSize() + extra_ids_; }

std::vector<int64_t> T5Tokenizer::tokenize(const std::string& text) const {
  std::vector<int64_t> ids;
  auto encode_plain = [&](std::string s) {
    if (s.empty()) return;
    // The reference splits words on Unicode whitespace after SentencePiece's normalisation;
    // SentencePiece itself only on ' '. Of all White_Space characters, T5's normalisation rules
    // leave only NEL (U+0085) as it is, so NEL becomes a space here (checked on every
    // whitespace code point against transformers' T5Tokenizer).
    for (size_t p = s.find("\xC2\x85"); p != std::string::npos; p = s.find("\xC2\x85", p)) s.replace(p, 2, " ");
    std::vector<int> piece_ids;
    const auto status = sp_->Encode(s, &piece_ids);
    if (!status.ok()) throw Error("T5 tokenizer: SentencePiece failed: " + status.ToString(), ErrorKind::Internal);
    ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
  };
  // Special tokens written in the text are matched first (leftmost, longest), the rest is encoded.
  size_t pos = 0, plain_begin = 0;
  while (pos < text.size()) {
    if (text[pos] != '<') {
      ++pos;
      continue;
    }
    const std::pair<std::string, int64_t>* hit = nullptr;
    for (const auto& s : specials_)
      if (text.compare(pos, s.first.size(), s.first) == 0 && (!hit || s.first.size() > hit->first.size())) hit = &s;
    if (!hit) {
      ++pos;
      continue;
    }
    encode_plain(text.substr(plain_begin, pos - plain_begin));
    ids.push_back(hit->second);
    pos += hit->first.size();
    plain_begin = pos;
  }
  encode_plain(text.substr(plain_begin));
  return ids;
}

std::vector<int64_t> T5Tokenizer::encode(const std::string& text, int64_t max_length, bool pad) const {
  if (max_length < 1) throw Error("T5 tokenizer: max_sequence_length must be at least 1");
  std::vector<int64_t> ids = tokenize(text);
  if (static_cast<int64_t>(ids.size()) > max_length - 1) ids.resize(static_cast<size_t>(max_length - 1));
  ids.push_back(eos_id_);
  if (pad) ids.resize(static_cast<size_t>(max_length), pad_id_);
  return ids;
}

}  // namespace fluxtrain
