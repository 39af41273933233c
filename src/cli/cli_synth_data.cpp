// fluxtrain synth-data: writes a small learnable synthetic dataset (src/data/synth_data.h) in the
// HDF5 layout of docs/dataset.md, with widths taken from a model size (default: tiny).
#include <iostream>
#include <sstream>

#include <boost/program_options.hpp>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/fs.h"
#include "data/synth_data.h"
#include "model/flux_config.h"

namespace po = boost::program_options;

namespace fluxtrain {

int cmd_synth_data(int argc, char** argv) {
  SynthSpec s;
  std::string output, size = "tiny", sizes = "16", latent_dtype = "f32", embed_dtype = "bf16";
  int64_t seed = 0;
  po::options_description desc("synth-data options");
  desc.add_options()
      ("output", po::value(&output)->required(), "HDF5 file to write")
      ("size", po::value(&size)->default_value(size), "model size whose widths to use (tiny, flux-dev, ...)")
      ("num_samples", po::value(&s.num_samples)->default_value(s.num_samples), "samples")
      ("sizes", po::value(&sizes)->default_value(sizes), "target latent sides (pixels/8), comma list, cycled")
      ("cond_latent_size", po::value(&s.cond_latent_size)->default_value(s.cond_latent_size),
       "condition latent side (0 = same as the target)")
      ("num_conditions", po::value(&s.num_conditions)->default_value(s.num_conditions), "condition columns")
      ("cond_kind", po::value(&s.cond_kind)->default_value(s.cond_kind), "subject | spatial")
      ("text_len", po::value(&s.text_len)->default_value(s.text_len), "T5 tokens per sample")
      ("target_scale", po::value(&s.target_scale)->default_value(s.target_scale), "target std")
      ("latent_dtype", po::value(&latent_dtype)->default_value(latent_dtype), "f32 | bf16 | f16")
      ("embed_dtype", po::value(&embed_dtype)->default_value(embed_dtype), "bf16 | f16 | f32")
      ("seed", po::value(&seed)->default_value(0), "random seed");
  po::variables_map vm;
  if (!parse_command_line("synth-data", desc, argc, argv, vm)) return 0;
  check_input(seed >= 0, "--seed must be >= 0");
  s.seed = static_cast<uint64_t>(seed);
  const FluxConfig cfg = FluxConfig::preset(size);
  s.latent_channels = cfg.in_channels / 4;
  s.text_dim = cfg.context_in_dim;
  s.pooled_dim = cfg.vec_in_dim;
  s.latent_dtype = parse_dtype(latent_dtype, "--latent_dtype");
  s.embed_dtype = parse_dtype(embed_dtype, "--embed_dtype");
  check_input(s.latent_dtype != at::kDouble && s.embed_dtype != at::kDouble, "float64 is not a dataset dtype");
  s.sizes.clear();
  std::stringstream ss(sizes);
  for (std::string item; std::getline(ss, item, ',');) {
    try {
      s.sizes.push_back(std::stoll(item));
    } catch (...) {
      throw Error("--sizes: '" + item + "' is not an integer");
    }
  }
  write_synthetic_dataset(output, s);
  std::cout << output << "\n";
  return 0;
}

}  // namespace fluxtrain
