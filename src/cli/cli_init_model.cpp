// fluxtrain init-model: a randomly initialised transformer written in the layouts a real
// FLUX.1 snapshot has (BFL single file at the root, diffusers transformer/ folder), so that
// tests and benchmarks load real files through the real loading code.
#include <iostream>

#include <ATen/ATen.h>
#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/fs.h"
#include "encoders/autoencoder_weights.h"
#include "encoders/tiny_text_encoders.h"
#include "model/flux_weights.h"

namespace po = boost::program_options;

namespace fluxtrain {

int cmd_init_model(int argc, char** argv) {
  std::string size, out, dtype_s, layout;
  uint64_t seed = 0;
  double shard_mb = 5000;
  po::options_description desc("init-model options");
  desc.add_options()
      ("size", po::value(&size)->default_value("tiny"), "tiny, tiny-schnell, flux-dev or flux-schnell")
      ("output_dir", po::value(&out)->required(), "snapshot directory to write")
      ("seed", po::value(&seed)->default_value(0), "random seed")
      ("dtype", po::value(&dtype_s)->default_value("f32"), "weight dtype: f32, bf16, f16, f64")
      ("layout", po::value(&layout)->default_value("both"), "both, bfl or diffusers")
      ("max_shard_size_mb", po::value(&shard_mb)->default_value(5000), "diffusers shard size limit (MB)");
  po::variables_map vm;
  if (!parse_command_line("init-model", desc, argc, argv, vm)) return 0;
  if (layout != "both" && layout != "bfl" && layout != "diffusers")
    throw Error("--layout must be both, bfl or diffusers, got '" + layout + "'");
  const FluxConfig cfg = FluxConfig::preset(size);
  const at::ScalarType dtype = parse_dtype(dtype_s, "--dtype");
  TensorMap w = init_random_weights(cfg, seed, dtype);
  make_directories(out);
  const std::string bfl_name = cfg.guidance_embed ? "flux1-dev.safetensors" : "flux1-schnell.safetensors";
  if (layout != "diffusers") save_bfl(path_join(out, bfl_name), cfg, w);
  if (layout != "bfl") {
    save_diffusers(path_join(out, "transformer"), cfg, w, static_cast<uint64_t>(shard_mb * 1e6));
    nlohmann::json index = {{"_class_name", "FluxPipeline"},
                            {"_diffusers_version", "0.30.0"},
                            {"transformer", {"diffusers", "FluxTransformer2DModel"}}};
    write_text_file_atomic(path_join(out, "model_index.json"), index.dump(2));
  }
  write_random_autoencoder(out, size, seed, dtype, layout);  // ae.safetensors and/or vae/
  // Tiny snapshots also get tiny text encoders and the real tokenizer files (quickstart from captions).
  if (size.rfind("tiny", 0) == 0) write_tiny_text_encoders(out, cfg.vec_in_dim, cfg.context_in_dim, seed, dtype);
  std::cout << out << "\n";
  return 0;
}

}  // namespace fluxtrain
