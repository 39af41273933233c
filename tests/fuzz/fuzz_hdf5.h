// Shared by the libFuzzer targets that read or write HDF5 (dataset, checkpoint, jsonl): HDF5
// set up once per process for speed, without changing what is parsed.
#pragma once
#include <hdf5.h>

namespace fluxtrain::fuzz {

// HDF5 keeps freed blocks of its own structures on free lists, but only up to small limits
// (a few MB); larger blocks go back to malloc. The metadata cache HDF5 allocates for every
// file it opens (H5C_t, ~0.6 MB with its hash table) is above that, so every input cost a
// fresh calloc: under ASan a new mmap, ~150 zeroed pages faulted in, and an munmap later
// (about a third of fuzz_dataset's time went to page faults). Unbounded free lists let HDF5
// reuse the block. HDF5 is not instrumented, so ASan sees no accesses inside it either way;
// fluxtrain's own allocations are untouched.
inline void hdf5_init_for_fuzzing() {
  H5dont_atexit();  // as hdf5_io.cpp does, before any other HDF5 call (see Guard there)
  H5set_free_list_limits(-1, -1, -1, -1, -1, -1);
}

}  // namespace fluxtrain::fuzz
