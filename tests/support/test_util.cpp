#include "support/test_util.h"

#include "core/fs.h"

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <sys/wait.h>

#include <ATen/ATen.h>

namespace fluxtrain {

TempDir::TempDir() {
  const char* t = std::getenv("TMPDIR");
  std::string tmpl = std::string(t && *t ? t : "/tmp") + "/fluxtrain-test-XXXXXX";
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("TempDir: mkdtemp failed for " + tmpl);
  dir_ = tmpl;
}
TempDir::~TempDir() {
  remove_tree(dir_);
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
