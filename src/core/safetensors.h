// safetensors reader (mmap, header validated) and writer (atomic: temp file + rename).
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
// optional "__metadata__": {str: str}, then the raw little-endian tensor bytes.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
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
  // A copy of the tensor in CPU memory (owning; independent of the mapping).
  at::Tensor load(const std::string& name) const;
  TensorMap load_all() const;

 private:
  std::string path_;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
  const uint8_t* data_ = nullptr;  // start of the data section
  void* map_ = nullptr;
  size_t map_size_ = 0;
};

TensorMap load(const std::string& path);
// Writes contiguous CPU copies of the tensors; atomic (path.tmp.<pid> then rename).
void save(const std::string& path, const TensorMap& tensors,
          const std::map<std::string, std::string>& metadata = {});

}  // namespace fluxtrain::safetensors
