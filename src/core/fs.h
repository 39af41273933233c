// Filesystem helpers. Every file fluxtrain writes goes through AtomicFile: bytes go to
// "<path>.tmp.<pid>", are flushed and fsync'ed, and only commit() renames them over <path>.
// A crash or an exception before commit() leaves <path> as it was and removes the temp file.
#pragma once
#include <cstddef>
#include <cstdio>
#include <string>
#include <vector>

namespace fluxtrain {

class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();  // without commit(): removes the temp file
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const void* data, size_t bytes);
  void commit();
  const std::string& temp_path() const { return tmp_; }

 private:
  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
};

// Temp path used for `path` by this process (also used by HDF5 writers).
std::string temp_path_for(const std::string& path);
// fsync + rename(tmp, path); throws Error naming path.
void commit_temp(const std::string& tmp, const std::string& path);

// POSIX-based on purpose: std::filesystem symbols are exported by some LibTorch builds
// (the GPU machine's libtorch.so) in an incompatible form, and calls resolved there crash.
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
std::string read_text_file(const std::string& path);
void write_text_file_atomic(const std::string& path, const std::string& text);
void make_directories(const std::string& path);
std::string path_join(const std::string& a, const std::string& b);
// Names (not paths) of the entries of a directory, sorted; empty when it cannot be read.
std::vector<std::string> list_directory(const std::string& dir);
bool remove_file(const std::string& path);  // false when it did not exist or could not go
void remove_tree(const std::string& path);  // rm -rf; silent
std::string file_extension(const std::string& path);  // ".safetensors" or ""

}  // namespace fluxtrain
