// Shared by the libFuzzer targets: the input as a file (the readers take paths), and the rule
// for what counts as a finding.
//
// A reader given any bytes must either succeed or throw fluxtrain::Error (one clear line, exit
// 2). A crash, a sanitizer report, a hang, or any other exception escaping (LibTorch, nlohmann,
// std::bad_alloc ...: an "internal error" for the user) is a finding: the harness lets it abort.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/error.h"

namespace fluxtrain::fuzz {

// One file per process (libFuzzer runs inputs one after another in a process), under TMPDIR.
inline const std::string& scratch_path(const char* suffix) {
  static const std::string p = [&] {
    const char* d = std::getenv("TMPDIR");
    return std::string(d && *d ? d : "/tmp") + "/fluxtrain_fuzz_" + std::to_string(::getpid()) + suffix;
  }();
  return p;
}

inline const std::string& write_input(const uint8_t* data, size_t size, const char* suffix) {
  const std::string& p = scratch_path(suffix);
  std::FILE* f = std::fopen(p.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  return p;
}

// Decoders (libvips, the ImageMagick loader behind it, LibTorch) on one thread each, as
// tests/fuzz/run_long.sh asks too: a fuzzer process runs one input at a time, and under ASan
// every thread a library starts or wakes per input costs more than the small image it decodes.
// Set in LLVMFuzzerInitialize, before libvips starts; a value in the environment is kept.
inline void single_threaded_decoders() {
  ::setenv("VIPS_CONCURRENCY", "1", 0);
  ::setenv("MAGICK_THREAD_LIMIT", "1", 0);
  ::setenv("OMP_NUM_THREADS", "1", 0);
}

template <class F>
void expect_clean(F&& body) {
  try {
    body();
  } catch (const Error&) {
    // The expected outcome for bad input.
  }
}

}  // namespace fluxtrain::fuzz
