#include "core/limits.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <thread>

#include "core/error.h"

namespace fluxtrain::limits {

namespace {

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace

void check_range(const std::string& what, int64_t v, int64_t lo, int64_t hi, const std::string& hint) {
  if (v >= lo && v <= hi) return;
  throw Error(what + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(v) +
              hint);
}

void check_range(const std::string& what, double v, double lo, double hi, const std::string& hint) {
  if (std::isfinite(v) && v >= lo && v <= hi) return;
  throw Error(what + " must be in [" + num(lo) + ", " + num(hi) + "], got " + num(v) + hint);
}

int64_t parse_int(const std::string& flag, const std::string& s, int64_t lo, int64_t hi) {
  errno = 0;
  char* end = nullptr;
  const long long v = s.empty() ? 0 : std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || !end || *end != '\0' || std::isspace(static_cast<unsigned char>(s[0])))
    throw Error(flag + ": '" + printable(s, 60) + "' is not an integer");
  if (errno == ERANGE || v < lo || v > hi)
    throw Error(flag + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + printable(s, 60));
  return v;
}

int64_t max_threads() {
  const int64_t hw = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  return std::max(kMinThreadCap, hw * kThreadsPerHardwareThread);
}

void check_config_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    throw Error("--config " + path + ": cannot open file (" + std::strerror(errno) + ")");
  if (S_ISDIR(st.st_mode)) throw Error("--config " + path + ": is a directory, expected an INI file");
  if (!S_ISREG(st.st_mode)) throw Error("--config " + path + ": not a regular file, expected an INI file");
  if (::access(path.c_str(), R_OK) != 0)
    throw Error("--config " + path + ": cannot read file (" + std::strerror(errno) + ")");
}

std::string printable(const std::string& bytes, size_t max_bytes) {
  std::string out;
  const size_t n = bytes.size();
  auto hex = [&out](unsigned char c) {
    static const char* d = "0123456789abcdef";
    out += "\\x";
    out += d[c >> 4];
    out += d[c & 15];
  };
  size_t i = 0;
  while (i < n) {
    if (out.size() >= max_bytes) {
      out += "...";
      break;
    }
    const unsigned char c = static_cast<unsigned char>(bytes[i]);
    if (c < 0x80) {
      if (c == '\t') out += ' ';
      else if (c < 0x20 || c == 0x7f) hex(c);
      else out += static_cast<char>(c);
      ++i;
      continue;
    }
    // UTF-8: length from the lead byte; reject overlong forms, surrogates and > U+10FFFF.
    size_t len = 0;
    uint32_t cp = 0;
    if (c >= 0xc2 && c <= 0xdf) len = 2, cp = c & 0x1f;
    else if (c >= 0xe0 && c <= 0xef) len = 3, cp = c & 0x0f;
    else if (c >= 0xf0 && c <= 0xf4) len = 4, cp = c & 0x07;
    bool ok = len > 0 && i + len <= n;
    for (size_t k = 1; ok && k < len; ++k) {
      const unsigned char cc = static_cast<unsigned char>(bytes[i + k]);
      ok = (cc & 0xc0) == 0x80;
      cp = (cp << 6) | (cc & 0x3f);
    }
    if (ok) ok = !(len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) && !(len == 4 && (cp < 0x10000 || cp > 0x10ffff));
    // C1 controls (U+0080..U+009F) are not printable either.
    if (ok && cp >= 0x80 && cp <= 0x9f) ok = false;
    if (ok) {
      out.append(bytes, i, len);
      i += len;
    } else {
      hex(c);
      ++i;
    }
  }
  return out;
}

}  // namespace fluxtrain::limits
