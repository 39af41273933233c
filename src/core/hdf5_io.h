// Small RAII helpers over the HDF5 C API, for datasets (src/data) and checkpoints (src/train).
//
// Every call takes one process-wide lock: the dataset is read by a background thread while the
// trainer writes checkpoints, and HDF5 builds without --enable-threadsafe must never be entered
// twice at once. Every failure is an Error naming the file and the object ("x.h5: /target/data:
// ...") and HDF5's own error stack printing is switched off.
//
// Tensors: float32/float64/int64/int32/uint8/bool map to native HDF5 types; bfloat16 and float16
// are stored as uint16 with the string attribute "dtype" = "bfloat16" | "float16" and come back
// with their dtype. Writes of non-empty tensors are chunked and compressed (shuffle + deflate).
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fluxtrain::h5 {

using hid = int64_t;  // hid_t without including hdf5.h here

std::recursive_mutex& lock();

// One open HDF5 object (file, group or dataset); closes it on destruction.
class Object {
 public:
  Object() = default;
  Object(hid id, int kind, std::string file, std::string path);
  ~Object();
  Object(Object&& o) noexcept;
  Object& operator=(Object&& o) noexcept;
  Object(const Object&) = delete;
  Object& operator=(const Object&) = delete;
  hid id() const { return id_; }
  bool valid() const { return id_ >= 0; }
  const std::string& file() const { return file_; }
  const std::string& path() const { return path_; }
  std::string where(const std::string& child = "") const;  // "file: /path/child"
  void close();

 protected:
  hid id_ = -1;
  int kind_ = 0;  // 0 none, 1 file, 2 group, 3 dataset
  std::string file_, path_;
};

struct WriteOptions {
  int deflate = 4;              // 0..9; 0 = no compression
  int64_t chunk_bytes = 1 << 20;  // target chunk size; chunks hold whole rows of dim 0
};

// A file or group: children, attributes, datasets.
class Location : public Object {
 public:
  using Object::Object;
  bool has(const std::string& name) const;                 // direct child (link) exists
  Location group(const std::string& name) const;           // opens; error if missing
  Location create_group(const std::string& name) const;
  std::vector<std::string> children() const;               // link names, sorted

  bool has_attr(const std::string& name) const;
  void set_attr(const std::string& name, int64_t v) const;
  void set_attr(const std::string& name, double v) const;
  void set_attr(const std::string& name, const std::string& v) const;
  void set_attr(const std::string& name, const std::vector<int64_t>& v) const;
  int64_t attr_int(const std::string& name) const;
  double attr_double(const std::string& name) const;
  std::string attr_string(const std::string& name) const;
  std::vector<int64_t> attr_ints(const std::string& name) const;

  // Datasets.
  void write_tensor(const std::string& name, const at::Tensor& t, const WriteOptions& o = {}) const;
  at::Tensor read_tensor(const std::string& name) const;
  // Rows [begin, begin+count) along dim 0.
  at::Tensor read_rows(const std::string& name, int64_t begin, int64_t count) const;
  std::vector<int64_t> shape(const std::string& name) const;
  // fixed_length: one fixed-size string type for all (the longest), not HDF5's variable-length
  // strings, whose reading goes through HDF5's global heap: a crafted file crashes HDF5 1.10
  // there (found by fuzzing); readers of untrusted files pass allow_variable = false.
  void write_strings(const std::string& name, const std::vector<std::string>& s, bool fixed_length = false) const;
  std::vector<std::string> read_strings(const std::string& name, bool allow_variable = true) const;
};

class File : public Location {
 public:
  using Location::Location;
  // Opens an existing file; a missing, unreadable or non-HDF5 file is a one-line Error.
  static File open(const std::string& path, bool writable = false);
  static File create(const std::string& path);  // truncates
  void flush() const;

  // In-memory files (HDF5's core driver, no backing store): nothing touches the disk, so a full
  // disk or an I/O error can only happen where the caller writes image() itself (atomically,
  // with the system's reason), never inside HDF5 (whose failed flushes leave a half-closed file
  // that crashes the library's shutdown). `name` only appears in messages.
  static File create_in_memory(const std::string& name);
  // The complete file as bytes (flushes first).
  std::string image() const;
  // Opens a file image held in memory (read-only; the bytes are copied).
  static File open_image(const std::string& name, const std::string& bytes);
};

// The innermost reason on HDF5's error stack of this thread (e.g. the system's "No space left on
// device" from a failed write), "" when there is none. Call right after the failing HDF5 call.
std::string error_reason();

// A dataset that grows along dim 0 (rows of a fixed inner shape), chunked and compressed.
class Appendable {
 public:
  Appendable() = default;
  Appendable(const Location& parent, const std::string& name, at::ScalarType dtype,
             std::vector<int64_t> inner_shape, int64_t chunk_rows, int deflate = 4);
  void append(const at::Tensor& rows);  // [n, inner...]; dtype converted to the dataset's
  int64_t rows() const { return rows_; }

 private:
  Object ds_;
  at::ScalarType dtype_ = at::kFloat;
  std::vector<int64_t> inner_;
  int64_t rows_ = 0;
};

}  // namespace fluxtrain::h5
