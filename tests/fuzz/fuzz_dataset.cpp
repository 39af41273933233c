// libFuzzer target: the HDF5 dataset reader (src/data/dataset.h): open, every sample read.
// Datasets are not checksummed (they are large and written by other tools), so the bytes go to
// HDF5 as they are.
#include <ATen/ATen.h>

#include "data/dataset.h"
#include "tests/fuzz/fuzz_hdf5.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fluxtrain::fuzz::hdf5_init_for_fuzzing();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fluxtrain;
  const std::string& path = fuzz::write_input(data, size, ".h5");
  fuzz::expect_clean([&] {
    Dataset ds(path);
    for (int64_t i = 0; i < std::min<int64_t>(ds.size(), 4); ++i) (void)ds.read(i);
  });
  return 0;
}
