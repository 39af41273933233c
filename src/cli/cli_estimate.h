// Shared by `fluxtrain estimate` and `fluxtrain doctor`: a MemoryEstimateInput from a training
// INI file (the options of `fluxtrain train` that change peak memory; every other key is
// ignored) and command-line overrides, plus the preset files that ship in configs/.
#pragma once
#include <string>
#include <vector>

#include <boost/program_options/options_description.hpp>
#include <boost/program_options/variables_map.hpp>

#include "train/memory_estimate.h"

namespace fluxtrain {

// Declares the memory-relevant training options (bound to a hidden raw struct) and --size.
class EstimateOptions {
 public:
  EstimateOptions();
  boost::program_options::options_description& description() { return desc_; }
  // The input for `config_file` ("" = defaults), with the command line's values (argv as the
  // subcommand got it; options of other descriptions are skipped) winning.
  MemoryEstimateInput resolve(const std::string& config_file, int argc, char** argv) const;

 private:
  boost::program_options::options_description desc_;
};

// The directory of the shipped presets: $FLUXTRAIN_CONFIGS, ./configs, or configs/ next to the
// binary's build or install tree. "" when none is found.
std::string find_configs_dir();

// The guide's tiers, most capable first: file, seed-guide script (or ""), goal in GiB.
struct PresetTier {
  std::string file, script;
  double goal_gib;
};
const std::vector<PresetTier>& preset_tiers();

}  // namespace fluxtrain
