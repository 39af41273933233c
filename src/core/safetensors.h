// safetensors reader (mmap, header validated) and writer (atomic: temp file + rename).
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
// optional "__metadata__": {str: str}, then the raw little-endian tensor bytes.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "core/tensor_map.h"

namespace fluxtrain::safetensors {

struct Entry {
  std::string dtype;            // "F32", "F16", "BF16", "F64", "F8_E4M3", "I64", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets into the data section
};

// A validated, memory-mapped safetensors file. Every check happens in open(): a file that
// opens is safe to read any entry of.
//
// Loading never holds a second copy of the data: load() returns a tensor that views the mapping
// (zero copy) whenever the tensor's bytes are aligned to its element size, which is every tensor
// of a well-formed file. The mapping is private and writable (copy-on-write), so a loaded
// tensor behaves like an owning copy: writing into it never reaches the file or another load.
// Only the first load of an entry is a view (later loads of it are copies), so two loads never
// share memory. A view keeps the mapping alive after the File is gone, and when it is freed it returns its
// pages to the kernel (madvise DONTNEED on the pages only it covers), so that reading a model
// block by block and dropping each block keeps the resident set at one block, not the file.
// Misaligned tensors are copied out, and the pages they were copied from are dropped likewise.
class File {
 public:
  explicit File(const std::string& path);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, Entry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  // The tensor in CPU memory: a view of the mapping when aligned, else a copy (see above).
  at::Tensor load(const std::string& name) const;
  // Whether load(name) would be zero-copy now.
  bool is_view(const std::string& name) const;
  TensorMap load_all() const;

 private:
  std::string path_;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
  struct Mapping;
  mutable std::mutex mutex_;
  mutable std::set<std::string> viewed_;  // entries handed out as views
  std::shared_ptr<Mapping> map_;   // shared with the views handed out
  const uint8_t* data_ = nullptr;  // start of the data section
};

TensorMap load(const std::string& path);
// Writes contiguous CPU copies of the tensors; atomic (path.tmp.<pid> then rename).
void save(const std::string& path, const TensorMap& tensors,
          const std::map<std::string, std::string>& metadata = {});

}  // namespace fluxtrain::safetensors
