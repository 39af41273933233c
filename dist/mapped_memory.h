// Physical memory mapped at several virtual addresses at once.
//
// Why: a sharded block is used as one contiguous buffer in which this rank's own shard sits at
// offset rank * part. Gathering into a reusable buffer would copy the own shard every time
// (1/N of every gather; on one rank the whole model twice per step, and on an H100 such a
// copy hides behind matmuls for only 15-27% of its time). Instead each block has its own
// virtual windows: the own part is mapped from the block's permanent shard memory, the other
// ranks' parts from one of two shared slot allocations. Gathering writes only those parts.
//
// Two backends: host memory (memfd + mmap, for the MPI/CPU path and the tests) and CUDA
// virtual memory management (cuMemCreate/cuMemMap, GPU build only). Sizes and offsets passed
// to create/reserve/map must be multiples of granularity(). Everything is unmapped and freed
// by the destructor, which must outlive every tensor that points into a mapping.
#pragma once
#include <cstddef>
#include <memory>

#include <c10/core/Device.h>

namespace fluxtrain::dist {

class MappedMemory {
 public:
  virtual ~MappedMemory() = default;
  virtual c10::Device device() const = 0;
  virtual size_t granularity() const = 0;
  // A physical allocation of `bytes` (> 0); returns its handle. Contents are unspecified.
  virtual int create(size_t bytes) = 0;
  // A range of `bytes` of address space with nothing mapped yet; returns its base.
  virtual char* reserve(size_t bytes) = 0;
  // Maps [offset, offset + bytes) of allocation `handle` read-write at `va` (inside a reserved
  // range, not mapped yet). bytes == 0 does nothing.
  virtual void map(char* va, size_t bytes, int handle, size_t offset) = 0;
};

std::unique_ptr<MappedMemory> make_host_mapped_memory();
// GPU build only; the CUDA device must be selected already.
std::unique_ptr<MappedMemory> make_cuda_mapped_memory(int device_index);

}  // namespace fluxtrain::dist
