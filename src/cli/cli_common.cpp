#include "cli/cli_common.h"

#include <iostream>

#include <ATen/Context.h>
#include <boost/program_options/parsers.hpp>

#include "core/error.h"

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

}  // namespace fluxtrain
