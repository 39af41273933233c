// libFuzzer target: prepare's jsonl reader and line validator (src/data/prepare.cpp, phase 1):
// the input is written as the jsonl file and `prepare_dataset` runs on it with images stored
// (no VAE). Lines are JSON-parsed and checked (keys, column types, image paths, captions, the
// condition count); paths resolve next to the jsonl file, where the seed corpus leaves one real
// image (fuzz_input.png: written once per process when libvips is built in), so lines naming it
// go on through decoding, buckets and the HDF5 writer.
#include <cstdio>

#include "core/fs.h"
#include "data/image_io.h"
#include "data/prepare.h"
#include "tests/fuzz/fuzz_hdf5.h"
#include "tests/fuzz/fuzz_util.h"

#include <ATen/ATen.h>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fluxtrain::fuzz::single_threaded_decoders();
  fluxtrain::fuzz::hdf5_init_for_fuzzing();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fluxtrain;
  static std::FILE* devnull = std::fopen("/dev/null", "w");
  const std::string& path = fuzz::write_input(data, size, ".jsonl");
  static const bool image = [&] {
    // A 16x16 picture beside the jsonl (its folder is where relative paths resolve).
    const std::string dir = path.substr(0, path.rfind('/'));
    try {
      save_png(path_join(dir, "fuzz_input.png"), at::full({16, 16, 3}, 128, at::TensorOptions().dtype(at::kByte)));
      return true;
    } catch (const Error&) {
      return false;  // built without libvips: lines naming images stop at decoding
    }
  }();
  (void)image;
  static const std::string out = path + ".h5";  // (scratch_path keeps its first suffix)
  PrepareOptions o;
  o.jsonl = path;
  o.output = out;
  o.spatial_column = "source";
  o.subject_column = "subject";
  o.noise_size = 32;
  o.cond_size = 16;
  o.log = devnull;
  o.tty = 0;
  fuzz::expect_clean([&] { prepare_dataset(o); });
  remove_file(out);  // each input from scratch (no incremental re-run)
  return 0;
}
