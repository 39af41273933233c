// libFuzzer target: the image decoder wrapper (src/data/image_io.h, libvips) on arbitrary bytes
// written as a file: header probe, full decode to [H, W, 3] uint8 (orientation, ICC, bit depth,
// palette, alpha), and a resize of the result. Built only with libvips; libvips itself is not
// instrumented (its crashes are reported, its coverage is not seen).
#include <ATen/ATen.h>

#include "data/image_io.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fluxtrain::fuzz::single_threaded_decoders();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fluxtrain;
  const std::string& path = fuzz::write_input(data, size, ".img");
  fuzz::expect_clean([&] {
    const ImageSize s = probe_image(path);
    const at::Tensor rgb = load_image_rgb8(path);
    if (rgb.dim() != 3 || rgb.size(2) != 3 || rgb.size(0) != s.height || rgb.size(1) != s.width) std::abort();
    (void)resize_rgb8(rgb, 8, 8, ResizeFilter::Bilinear);
  });
  return 0;
}
