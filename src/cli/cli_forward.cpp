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
#include "model/model_options.h"
#include "core/options.h"
#include "train/setup.h"

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
  ModelConfig model;
  model.device = "cpu";
  std::string inputs, output, lora_path, dtype_s = "f32";
  std::vector<double> alphas;
  OptionSet s("forward", "fluxtrain forward: run the transformer on an inputs .safetensors file (docs/forward.md)");
  s.group("General");
  declare_options(s, model, /*training=*/false);
  s.group("Forward")
      .add("inputs", &inputs, "inputs .safetensors (docs/forward.md; required)")
      .add("output", &output, "output .safetensors (tensor 'output'; required)")
      .add("lora", &lora_path, "LoRA weights .safetensors: easycontrol, diffusers or kohya format (from the keys)")
      .add("network_alphas", &alphas, "alphas for a LoRA file without metadata")
      .add("dtype", &dtype_s, "compute dtype: f32, f64, bf16");
  if (!s.parse(argc, argv, std::cout)) return 0;
  for (const auto& [flag, v] : {std::pair<const char*, std::string>{"--pretrained_model_name_or_path",
                                                                    model.pretrained_model_name_or_path},
                                {"--inputs", inputs},
                                {"--output", output}})
    if (v.empty()) throw Error(std::string(flag) + " is required");
  RuntimeRequest rq;
  rq.device = model.device;
  rq.dtype = parse_dtype(dtype_s, "--dtype");
  parse_device(model.device, "--device");  // a clear error for a bad device name
  const Runtime rt = make_runtime(rq);

  configure_attention_backends();
  FluxInputs in = read_forward_inputs(inputs);
  TransformerSource source;
  // Its errors say "loading transformer: ...".
  source = open_transformer(model.pretrained_model_name_or_path, model.model_layout, rt.dtype);
  LoraSet lora;
  if (!lora_path.empty()) {
    lora = load_lora_file(lora_path, source.config, alphas);
    lora.to(at::TensorOptions().device(rt.device));
  }
  std::unique_ptr<BlockWeights> weights = make_block_weights(rt, weight_source(source), {});
  ForwardOptions opt;
  opt.gradient_checkpointing = model.gradient_checkpointing;
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = flux_forward(source.config, *weights, lora_path.empty() ? nullptr : &lora, in, opt);
  }
  safetensors::save(output, {{"output", out.to(at::kCPU)}}, {{"source", source.source}, {"layout", source.layout}});
  std::cout << output << "\n";
  return 0;
}

}  // namespace fluxtrain
