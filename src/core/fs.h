// Filesystem helpers. Every file fluxtrain writes goes through AtomicFile: bytes go to
// "<path>.tmp.<pid>", are flushed and fsync'ed, and only commit() renames them over <path>.
// A crash or an exception before commit() leaves <path> as it was and removes the temp file.
#pragma once
#include <cstddef>
#include <cstdio>
#include <string>

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

bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
std::string read_text_file(const std::string& path);
void write_text_file_atomic(const std::string& path, const std::string& text);
void make_directories(const std::string& path);
std::string path_join(const std::string& a, const std::string& b);

}  // namespace fluxtrain
