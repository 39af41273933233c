#include "encoders/clip_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/uchar.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>
#include <unicode/utf16.h>

#include <algorithm>
#include <climits>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "encoders/tokenizer_config.h"

namespace fluxtrain {

// CLIP's pre-tokenisation pattern: its special tokens, English contractions, runs of letters,
// single digits, runs of anything else that is not whitespace. Normalisation has already turned
// all Unicode whitespace (White_Space) into ' ', so the reference's \s is a plain space here; PCRE2's
// own \s would also take U+180E, which Unicode no longer counts as whitespace.
static const char* kClipPattern =
    R"(<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^ \p{L}\p{N}]+)";

struct ClipTokenizer::Regex {
  pcre2_code* code = nullptr;
  explicit Regex(const char* pattern) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                         &err, &off, nullptr);
    if (!code) throw Error("CLIP tokenizer: PCRE2 cannot compile the pre-tokenisation pattern", ErrorKind::Internal);
  }
  ~Regex() { pcre2_code_free(code); }
  // Every non-overlapping match of the pattern, left to right.
  std::vector<std::string> find_all(const std::string& s) const {
    std::vector<std::string> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code, nullptr);
    PCRE2_SIZE start = 0;
    while (start <= s.size()) {
      int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), start, 0, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        pcre2_match_data_free(md);
        throw Error("CLIP tokenizer: PCRE2 match failed (code " + std::to_string(rc) + ")", ErrorKind::Internal);
      }
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] == ov[0]) {  // empty match: cannot happen with this pattern; step on to be safe
        start = ov[1] + 1;
        continue;
      }
      out.emplace_back(s.substr(ov[0], ov[1] - ov[0]));
      start = ov[1];
    }
    pcre2_match_data_free(md);
    return out;
  }
};

namespace {

std::vector<UChar> to_utf16(const std::string& s) {
  UErrorCode st = U_ZERO_ERROR;
  int32_t n = 0;
  u_strFromUTF8WithSub(nullptr, 0, &n, s.data(), static_cast<int32_t>(s.size()), 0xFFFD, nullptr, &st);
  std::vector<UChar> out(static_cast<size_t>(n) + 1);
  st = U_ZERO_ERROR;
  u_strFromUTF8WithSub(out.data(), n + 1, &n, s.data(), static_cast<int32_t>(s.size()), 0xFFFD, nullptr, &st);
  if (U_FAILURE(st)) throw Error("CLIP tokenizer: cannot convert text to UTF-16", ErrorKind::Internal);
  out.resize(static_cast<size_t>(n));
  return out;
}

std::string to_utf8(const std::vector<UChar>& s) {
  UErrorCode st = U_ZERO_ERROR;
  int32_t n = 0;
  u_strToUTF8(nullptr, 0, &n, s.data(), static_cast<int32_t>(s.size()), &st);
  std::string out(static_cast<size_t>(n) + 1, '\0');
  st = U_ZERO_ERROR;
  u_strToUTF8(&out[0], n + 1, &n, s.data(), static_cast<int32_t>(s.size()), &st);
  if (U_FAILURE(st)) throw Error("CLIP tokenizer: cannot convert text to UTF-8", ErrorKind::Internal);
  out.resize(static_cast<size_t>(n));
  return out;
}

void append_utf16(std::vector<UChar>& out, UChar32 c) {
  if (c <= 0xFFFF) {
    out.push_back(static_cast<UChar>(c));
  } else {
    out.push_back(U16_LEAD(c));
    out.push_back(U16_TRAIL(c));
  }
}

std::string utf8_of(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// Splits text on occurrences of the special token strings (leftmost, longest first).
std::vector<std::pair<std::string, int>> split_specials(const std::string& text,
                                                        const std::vector<std::string>& specials) {
  std::vector<std::pair<std::string, int>> parts;  // (text, special index or -1)
  size_t pos = 0, plain_begin = 0;
  while (pos < text.size()) {
    int hit = -1;
    size_t hit_len = 0;
    for (size_t k = 0; k < specials.size(); ++k)
      if (!specials[k].empty() && specials[k].size() > hit_len && text.compare(pos, specials[k].size(), specials[k]) == 0) {
        hit = static_cast<int>(k);
        hit_len = specials[k].size();
      }
    if (hit < 0) {
      ++pos;
      continue;
    }
    if (pos > plain_begin) parts.emplace_back(text.substr(plain_begin, pos - plain_begin), -1);
    parts.emplace_back(specials[hit], hit);
    pos += hit_len;
    plain_begin = pos;
  }
  if (plain_begin < text.size()) parts.emplace_back(text.substr(plain_begin), -1);
  return parts;
}

}  // namespace

std::string clip_normalize(const std::string& text) {
  std::vector<UChar> u16 = to_utf16(text);
  UErrorCode st = U_ZERO_ERROR;
  const UNormalizer2* nfc = unorm2_getNFCInstance(&st);
  if (U_FAILURE(st)) throw Error("CLIP tokenizer: ICU has no NFC normalizer", ErrorKind::Internal);
  std::vector<UChar> n(u16.size() * 3 + 16);
  int32_t len = unorm2_normalize(nfc, u16.data(), static_cast<int32_t>(u16.size()), n.data(),
                                 static_cast<int32_t>(n.size()), &st);
  if (st == U_BUFFER_OVERFLOW_ERROR) {
    n.resize(static_cast<size_t>(len));
    st = U_ZERO_ERROR;
    len = unorm2_normalize(nfc, u16.data(), static_cast<int32_t>(u16.size()), n.data(), len, &st);
  }
  if (U_FAILURE(st)) throw Error("CLIP tokenizer: NFC normalisation failed", ErrorKind::Internal);
  n.resize(static_cast<size_t>(len));

  // Whitespace runs (Unicode White_Space) -> one space; then each character's own lower case,
  // without context (as the reference's per-character Lowercase normaliser: no final sigma).
  std::vector<UChar> out;
  out.reserve(n.size());
  bool in_space = false;
  for (int32_t i = 0; i < len;) {
    UChar32 c;
    U16_NEXT(n.data(), i, len, c);
    if (u_isUWhiteSpace(c)) {
      if (!in_space) out.push_back(u' ');
      in_space = true;
      continue;
    }
    in_space = false;
    if (c == 0x130) {  // LATIN CAPITAL LETTER I WITH DOT ABOVE: full mapping is i + combining dot
      out.push_back(u'i');
      out.push_back(0x307);
    } else {
      append_utf16(out, u_tolower(c));
    }
  }
  return to_utf8(out);
}

ClipTokenizer::ClipTokenizer(const std::string& dir) {
  const std::string vocab_path = path_join(dir, "vocab.json"), merges_path = path_join(dir, "merges.txt");
  if (!path_exists(vocab_path)) throw Error(vocab_path + ": missing (a CLIP tokenizer folder needs vocab.json and merges.txt)");
  if (!path_exists(merges_path)) throw Error(merges_path + ": missing (a CLIP tokenizer folder needs vocab.json and merges.txt)");
  {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_text_file(vocab_path));
    } catch (const nlohmann::json::exception& e) {
      throw Error(vocab_path + ": not valid JSON (truncated or not a vocabulary?): " + std::string(e.what()));
    }
    if (!j.is_object() || j.empty()) throw Error(vocab_path + ": expected a JSON object {token: id}");
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0)
        throw Error(vocab_path + ": id of token '" + it.key() + "' is not a non-negative integer");
      vocab_[it.key()] = it.value().get<int64_t>();
    }
  }
  {
    const std::string text = read_text_file(merges_path);
    size_t pos = 0;
    int64_t line_no = 0, rank = 0;
    while (pos < text.size()) {
      size_t end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      std::string line = text.substr(pos, end - pos);
      pos = end + 1;
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
      const size_t sp = line.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 >= line.size() || line.find(' ', sp + 1) != std::string::npos)
        throw Error(merges_path + ":" + std::to_string(line_no) + ": expected two tokens separated by one space, got '" +
                    line.substr(0, 60) + "'");
      merge_rank_.emplace(line, rank++);
    }
    if (rank == 0) throw Error(merges_path + ": no merges (empty or not a merges.txt)");
  }
  // GPT-2's byte-to-printable mapping: printable Latin-1 bytes stand for themselves, the others
  // take code points from 256 on, in byte order.
  {
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_char_[b] = utf8_of(printable ? static_cast<uint32_t>(b) : next++);
    }
  }
  TokenizerConfig cfg(dir);
  bos_ = cfg.token("bos_token", "<|startoftext|>");
  eos_ = cfg.token("eos_token", "<|endoftext|>");
  unk_ = cfg.token("unk_token", "<|endoftext|>");
  pad_ = cfg.token("pad_token", "<|endoftext|>");
  max_length_ = cfg.integer("model_max_length", 77);
  auto id_of = [&](const std::string& tok, const char* what) {
    auto it = vocab_.find(tok);
    if (it == vocab_.end())
      throw Error(vocab_path + ": the " + std::string(what) + " token '" + tok + "' is not in the vocabulary");
    return it->second;
  };
  bos_id_ = id_of(bos_, "BOS");
  eos_id_ = id_of(eos_, "EOS");
  unk_id_ = id_of(unk_, "unknown");
  pad_id_ = id_of(pad_, "padding");
  if (max_length_ < 2) throw Error(dir + ": model_max_length must be at least 2");
  split_ = std::make_unique<Regex>(kClipPattern);
}

ClipTokenizer::~ClipTokenizer() = default;

void ClipTokenizer::bpe_word(const std::string& piece, std::vector<int64_t>& out) const {
  std::vector<std::string> sym;
  for (unsigned char b : piece) sym.push_back(byte_char_[b]);
  if (sym.empty()) return;
  sym.back() += "</w>";
  // Repeatedly merge the adjacent pair with the lowest rank (all its occurrences, left to right).
  while (sym.size() > 1) {
    int64_t best = INT64_MAX;
    size_t best_i = 0;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      auto it = merge_rank_.find(sym[i] + " " + sym[i + 1]);
      if (it != merge_rank_.end() && it->second < best) {
        best = it->second;
        best_i = i;
      }
    }
    if (best == INT64_MAX) break;
    const std::string a = sym[best_i], b = sym[best_i + 1];
    std::vector<std::string> next;
    next.reserve(sym.size());
    for (size_t i = 0; i < sym.size();) {
      if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) {
        next.push_back(a + b);
        i += 2;
      } else {
        next.push_back(sym[i]);
        ++i;
      }
    }
    sym.swap(next);
  }
  for (const auto& s : sym) {
    auto it = vocab_.find(s);
    out.push_back(it == vocab_.end() ? unk_id_ : it->second);
  }
}

void ClipTokenizer::tokenize_plain(const std::string& text, std::vector<int64_t>& out) const {
  for (const std::string& piece : split_->find_all(clip_normalize(text))) bpe_word(piece, out);
}

std::vector<int64_t> ClipTokenizer::tokenize(const std::string& text) const {
  std::vector<int64_t> ids;
  const std::vector<std::string> specials{bos_, eos_};
  for (const auto& [part, special] : split_specials(text, specials)) {
    if (special >= 0)
      ids.push_back(special == 0 ? bos_id_ : eos_id_);
    else
      tokenize_plain(part, ids);
  }
  return ids;
}

std::vector<int64_t> ClipTokenizer::encode(const std::string& text, bool pad) const {
  std::vector<int64_t> body = tokenize(text);
  if (static_cast<int64_t>(body.size()) > max_length_ - 2) body.resize(static_cast<size_t>(max_length_ - 2));
  std::vector<int64_t> ids;
  ids.reserve(static_cast<size_t>(max_length_));
  ids.push_back(bos_id_);
  ids.insert(ids.end(), body.begin(), body.end());
  ids.push_back(eos_id_);
  if (pad) ids.resize(static_cast<size_t>(max_length_), pad_id_);
  return ids;
}

}  // namespace fluxtrain
