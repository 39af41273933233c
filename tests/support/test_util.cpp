#include "support/test_util.h"

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <filesystem>
#include <sys/wait.h>

#include <ATen/ATen.h>

namespace fluxtrain {

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "fluxtrain-test-XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("TempDir: mkdtemp failed for " + tmpl);
  dir_ = tmpl;
}
TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor ad = a.detach().to(at::kDouble), bd = b.detach().to(at::kDouble);
  const double den = bd.abs().max().item<double>();
  const double num = (ad - bd).abs().max().item<double>();
  return den == 0 ? num : num / den;
}

int run_command(const std::string& cmd, std::string* output) {
  std::FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return -1;
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int status = ::pclose(p);
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace fluxtrain
