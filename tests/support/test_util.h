// Small helpers shared by tests.
#pragma once
#include <string>

#include <ATen/core/Tensor.h>

namespace fluxtrain {

// A fresh directory under /tmp, removed with its contents at scope exit.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& dir() const { return dir_; }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

 private:
  std::string dir_;
};

// max |a-b| / max |b| (0 when both are zero).
double rel_err(const at::Tensor& a, const at::Tensor& b);

// Runs a shell command, returns its exit status; captures stderr+stdout into *output.
int run_command(const std::string& cmd, std::string* output = nullptr);

}  // namespace fluxtrain
