// fluxtrain forward: the transformer as a function from a .safetensors file of inputs to a
// .safetensors file with the output, so that anyone can compare fluxtrain with another FLUX
// implementation. Tensor names and shapes: docs/forward.md.
#include <iostream>

#include <ATen/ATen.h>
#include <boost/program_options.hpp>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/blocks.h"
#include "model/flux_transformer.h"
#include "model/flux_weights.h"
#include "model/lora_io.h"

namespace po = boost::program_options;

namespace fluxtrain {
namespace {

at::Tensor need(const safetensors::File& f, const std::string& name) {
  if (!f.contains(name)) throw Error(f.path() + ": missing input tensor '" + name + "'");
  return f.load(name);
}

// ids may come as [L,3] or with a batch dim [1,L,3] (older diffusers).
at::Tensor ids2d(const at::Tensor& t) { return t.dim() == 3 ? t[0] : t; }

}  // namespace

FluxInputs read_forward_inputs(const std::string& path) {
  safetensors::File f(path);
  FluxInputs in;
  in.img = need(f, "img");
  in.img_ids = ids2d(need(f, "img_ids"));
  in.txt = need(f, "txt");
  in.txt_ids = ids2d(need(f, "txt_ids"));
  in.y = need(f, "y");
  in.timesteps = need(f, "timesteps");
  if (f.contains("guidance")) in.guidance = f.load("guidance");
  if (f.contains("cond") != f.contains("cond_ids"))
    throw Error(path + ": 'cond' and 'cond_ids' must be given together");
  if (f.contains("cond")) {
    at::Tensor c = f.load("cond"), ci = f.load("cond_ids");
    if (c.dim() == 3) {
      in.cond.push_back(c);
      in.cond_ids.push_back(ci);
    } else if (c.dim() == 4 && ci.dim() == 3 && ci.size(0) == c.size(0)) {
      for (int64_t n = 0; n < c.size(0); ++n) {
        in.cond.push_back(c[n]);
        in.cond_ids.push_back(ci[n]);
      }
    } else {
      throw Error(path + ": 'cond' must be [B, Lc, C] with cond_ids [Lc, 3], or [N, B, Lc, C] with [N, Lc, 3]");
    }
  }
  return in;
}

int cmd_forward(int argc, char** argv) {
  std::string model, inputs, output, lora_path, dtype_s, device_s, layout;
  std::vector<double> alphas;
  bool ckpt = false;
  po::options_description desc("forward options");
  desc.add_options()
      ("pretrained_model_name_or_path", po::value(&model)->required(),
       "FLUX snapshot dir, diffusers transformer folder or BFL .safetensors file")
      ("inputs", po::value(&inputs)->required(), "inputs .safetensors (docs/forward.md)")
      ("output", po::value(&output)->required(), "output .safetensors (tensor 'output')")
      ("lora", po::value(&lora_path), "LoRA weights .safetensors (EasyControl or fluxtrain format)")
      ("network_alphas", po::value(&alphas)->multitoken(), "alphas for a LoRA file without metadata")
      ("dtype", po::value(&dtype_s)->default_value("f32"), "compute dtype: f32, f64, bf16")
      ("device", po::value(&device_s)->default_value("cpu"), "cpu or cuda[:N]")
      ("model_layout", po::value(&layout)->default_value("auto"), "auto, bfl or diffusers")
      ("gradient_checkpointing", po::bool_switch(&ckpt), "run blocks through the checkpointing path");
  po::variables_map vm;
  if (!parse_command_line("forward", desc, argc, argv, vm)) return 0;
  const at::ScalarType dtype = parse_dtype(dtype_s, "--dtype");
  const c10::Device device = parse_device(device_s, "--device");

  configure_attention_backends();
  FluxInputs in = read_forward_inputs(inputs);
  LoadedTransformer lt = load_transformer(model, layout, dtype);
  LoraSet lora;
  if (!lora_path.empty()) {
    lora = load_lora_file(lora_path, lt.config, alphas);
    lora.to(at::TensorOptions().device(device));
  }
  ResidentBlockWeights weights(lt.weights, lt.config.depth, lt.config.depth_single);
  weights.to(at::TensorOptions().device(device).dtype(dtype));
  ForwardOptions opt;
  opt.gradient_checkpointing = ckpt;
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = flux_forward(lt.config, weights, lora_path.empty() ? nullptr : &lora, in, opt);
  }
  safetensors::save(output, {{"output", out.to(at::kCPU)}}, {{"source", lt.source}, {"layout", lt.layout}});
  std::cout << output << "\n";
  return 0;
}

}  // namespace fluxtrain
