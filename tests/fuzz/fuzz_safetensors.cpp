// libFuzzer target: the safetensors reader (src/core/safetensors.h) on arbitrary bytes: header
// parsing, every tensor's dtype/shape/offsets, and reading each tensor.
#include <ATen/ATen.h>

#include "core/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fluxtrain;
  const std::string& path = fuzz::write_input(data, size, ".safetensors");
  fuzz::expect_clean([&] {
    safetensors::File f(path);
    for (const auto& kv : f.entries()) {
      at::Tensor t = f.load(kv.first);
      if (t.numel() > 0) (void)t.reshape({-1})[0].item<double>();  // touch the data
    }
  });
  return 0;
}
