// libFuzzer target: `fluxtrain train`'s flag and INI parser (src/train/run_config.h). The input is an
// INI file, followed optionally (after a "\n--\n" line) by extra command-line words, one per
// line; every value goes through the same conversions and range checks as a real run.
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "train/run_config.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fluxtrain;
  const std::string in(reinterpret_cast<const char*>(data), size);
  const size_t cut = in.find("\n--\n");
  const std::string ini = in.substr(0, cut);
  const std::string& path = fuzz::write_input(reinterpret_cast<const uint8_t*>(ini.data()), ini.size(), ".ini");
  std::vector<std::string> words = {"train", "--config", path, "--pretrained_model_name_or_path", "m",
                                    "--train_data", "d.h5"};
  if (cut != std::string::npos) {
    std::istringstream ss(in.substr(cut + 4));
    for (std::string w; std::getline(ss, w);) words.push_back(w);
  }
  std::vector<const char*> argv;
  for (const auto& w : words) argv.push_back(w.c_str());
  fuzz::expect_clean([&] {
    std::ostringstream help;
    ParsedArgs a = parse_train_args(static_cast<int>(argv.size()), argv.data(), help);
    (void)a.config.to_json().dump();
  });
  return 0;
}
