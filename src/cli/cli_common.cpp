#include "cli/cli_common.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <iostream>

#include <ATen/Context.h>
#include <boost/program_options/parsers.hpp>

#include "core/error.h"
#include "core/fs.h"

namespace po = boost::program_options;

namespace fluxtrain {

bool parse_command_line(const std::string& command, const po::options_description& desc, int argc, char** argv,
                        po::variables_map& vm) {
  po::options_description all(desc);
  all.add_options()("help,h", "show this help");
  try {
    po::store(po::parse_command_line(argc, argv, all), vm);
    if (vm.count("help")) {
      std::cout << "usage: fluxtrain " << command << " [options]\n" << all << "\n";
      return false;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    throw Error(std::string("bad flag: ") + e.what());
  }
  return true;
}

at::ScalarType parse_dtype(const std::string& s, const std::string& flag) {
  if (s == "f32" || s == "float32" || s == "fp32" || s == "no") return at::kFloat;
  if (s == "f64" || s == "float64" || s == "fp64") return at::kDouble;
  if (s == "bf16" || s == "bfloat16") return at::kBFloat16;
  if (s == "f16" || s == "float16" || s == "fp16") return at::kHalf;
  throw Error(flag + ": unknown dtype '" + s + "' (expected f32, f64, bf16 or f16)");
}

c10::Device parse_device(const std::string& s, const std::string& flag) {
  c10::Device d(c10::kCPU);
  try {
    d = c10::Device(s);
  } catch (const std::exception&) {
    throw Error(flag + ": unknown device '" + s + "' (expected cpu or cuda[:N])");
  }
  if (d.is_cuda() && !at::hasCUDA())
    throw Error(flag + ": '" + s + "' asked for, but this build or machine has no CUDA");
  return d;
}

namespace {

std::string parent_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

void check_output_file(const std::string& flag, const std::string& path,
                       const std::vector<std::pair<std::string, std::string>>& inputs) {
  check_input(!path.empty(), flag + " is empty");
  check_input(path.back() != '/', flag + " " + path + ": is a directory, expected a file name");
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    check_input(!S_ISDIR(st.st_mode), flag + " " + path + ": is a directory, expected a file name");
    for (const auto& [in_flag, in_path] : inputs) {
      struct stat si;
      if (::stat(in_path.c_str(), &si) == 0 && si.st_dev == st.st_dev && si.st_ino == st.st_ino)
        throw Error(flag + " " + path + ": is the same file as " + in_flag + " (write to another file)");
    }
  }
  const std::string dir = parent_of(path);
  if (::stat(dir.c_str(), &st) != 0)
    throw Error(flag + " " + path + ": folder " + dir + " " +
                (errno == ENOENT ? "does not exist" : std::string("cannot be read (") + std::strerror(errno) + ")") +
                " (create it first)");
  check_input(S_ISDIR(st.st_mode), flag + " " + path + ": " + dir + " is not a folder");
}

void check_output_dir(const std::string& flag, const std::string& path) {
  check_input(!path.empty(), flag + " is empty");
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  struct stat st;
  for (;;) {
    if (::stat(p.c_str(), &st) == 0) {
      check_input(S_ISDIR(st.st_mode), flag + " " + path + ": " + (p == path ? std::string("is not a folder")
                                                                            : p + " is a file, not a folder"));
      return;
    }
    if (errno != ENOENT && errno != ENOTDIR) throw Error(flag + " " + path + ": " + p + ": " + std::strerror(errno));
    const std::string up = parent_of(p);
    if (up == p) return;
    p = up;
  }
}

}  // namespace fluxtrain
