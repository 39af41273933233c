// fluxtrain sample: pictures from a FLUX.1 snapshot (as `init-model` or Hugging Face lay it out:
// transformer in BFL or diffusers layout, ae.safetensors or vae/, text_encoder/, text_encoder_2/,
// tokenizer/, tokenizer_2/, optionally scheduler/scheduler_config.json), with any LoRA file
// fluxtrain reads and EasyControl conditions. Schedule, seeds and the KV cache: docs/sampling.md.
//   --bench: one JSON line (s/image, peak GiB, KV cache on/off); text states are random when the
//   snapshot has no text encoders (init-model --size flux-dev writes none), and
//   --bench_conditions N adds N random subject conditions with a random EasyControl LoRA.
#include <chrono>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <nlohmann/json.hpp>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "core/device_info.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/options.h"
#include "core/progress.h"
#include "core/safetensors.h"
#include "data/image_io.h"
#include "encoders/autoencoder.h"
#include "encoders/autoencoder_weights.h"
#include "encoders/text_encoders.h"
#include "model/blocks.h"
#include "model/flux_weights.h"
#include "model/lora_io.h"
#include "model/model_options.h"
#include "train/sampler.h"
#include "train/setup.h"

namespace fluxtrain {
namespace {

struct SampleCli {
  std::string prompt, prompts_file, output, output_dir, lora, dtype = "auto";
  std::vector<double> network_alphas;
  std::vector<std::string> subject_images, spatial_images;
  int64_t height = 1024, width = 1024, steps = 0, batch = 1, cond_size = 512, max_sequence_length = 512;
  int64_t seed = 0, zero_init_steps = 0;
  double guidance = 3.5;
  bool no_kv_cache = false, bench = false;
  int64_t bench_prompts = 1, bench_conditions = 0, bench_lora_rank = 128;
  std::string initial_latents, save_decoded;  // parity tests
  std::string text_encoder_lora;  // the CLIP/T5 LoRA `train` writes beside lora.safetensors
  double text_encoder_alpha = 0;
};

void sync(const c10::Device& d) {
  if (!d.is_cpu()) at::accelerator::synchronizeDevice(d.index() < 0 ? 0 : d.index());
}

std::string image_name(int64_t i) {
  std::ostringstream ss;
  ss << "image_" << std::setw(4) << std::setfill('0') << i << ".png";
  return ss.str();
}

}  // namespace

int cmd_sample(int argc, char** argv) {
  ModelConfig model;
  SampleCli c;
  OptionSet s("sample", "fluxtrain sample: images from a FLUX.1 snapshot with an optional LoRA (docs/sampling.md)");
  s.group("General");
  declare_options(s, model, /*training=*/false);
  s.group("Sampling")
      .add("prompt", &c.prompt, "the prompt (or --prompts)")
      .add("prompts", &c.prompts_file, "text file, one prompt a line (\\n, \\t, \\\\ escapes); needs --output_dir")
      .add("output", &c.output, "PNG file for a single --prompt")
      .add("output_dir", &c.output_dir, "folder for image_NNNN.png (one per prompt, in order)")
      .add("height", &c.height, "image height in pixels (multiple of 16)", rules::multiple_of_16())
      .add("width", &c.width, "image width in pixels (multiple of 16)", rules::multiple_of_16())
      .add("num_inference_steps", &c.steps, "Euler steps (0: 28 for guidance-embedding models, 4 for schnell)",
           rules::in_range(int64_t{0}, int64_t{10000}))
      .add("guidance_scale", &c.guidance, "guidance embedding value (dev models; schnell ignores it)", rules::finite())
      .add("seed", &c.seed, "image k starts from noise seeded by (seed, k)", rules::non_negative())
      .add("batch_size", &c.batch, "images per transformer call", rules::in_range(int64_t{1}, int64_t{4096}))
      .add("max_sequence_length", &c.max_sequence_length, "T5 tokens per prompt",
           rules::in_range(int64_t{1}, int64_t{512}))
      .add("dtype", &c.dtype, "auto (bf16 on CUDA, f32 on CPU), f32, f64, bf16")
      .add("lora", &c.lora, "LoRA .safetensors (any file `train`/`forward --lora` read)")
      .add("network_alphas", &c.network_alphas, "alphas for a LoRA file without metadata (EasyControl's own)")
      .add("text_encoder_lora", &c.text_encoder_lora,
           "text-encoder LoRA .safetensors (train's text_encoder_lora.safetensors; diffusers/peft/kohya keys); "
           "text-encoder keys inside --lora (kohya files) are applied without it")
      .add("text_encoder_alpha", &c.text_encoder_alpha, "alpha for a text-encoder LoRA file without metadata "
           "(0: alpha = rank)", rules::non_negative())
      .add("subject_image", &c.subject_images, "EasyControl subject condition image(s)")
      .add("spatial_image", &c.spatial_images, "EasyControl spatial condition image(s) (after the subject ones)")
      .add("cond_size", &c.cond_size, "condition images are resized to this (as in training)", rules::multiple_of_16())
      .add("zero_init_steps", &c.zero_init_steps, "first steps with zero velocity (EasyControl's pipeline: 1)",
           rules::non_negative())
      .add("no_kv_cache", &c.no_kv_cache, "recompute the condition stream at every step (same result, slower)")
      .add("bench", &c.bench, "time sampling, print one JSON line (docs/sampling.md)")
      .add("bench_prompts", &c.bench_prompts, "--bench: images to sample", rules::in_range(int64_t{1}, int64_t{64}))
      .add("bench_conditions", &c.bench_conditions, "--bench: random subject conditions with a random EasyControl LoRA",
           rules::in_range(int64_t{0}, int64_t{8}))
      .add("bench_lora_rank", &c.bench_lora_rank, "--bench: rank of that LoRA", rules::positive());
  s.group("Advanced").hidden()
      .add("initial_latents", &c.initial_latents, "safetensors with 'latents' [N, C, h, w]: starting noise")
      .add("save_decoded", &c.save_decoded, "also write 'images' [N,3,H,W] float32 and 'latents' to this file");
  if (!s.parse(argc, argv, std::cout)) return 0;

  const std::string& dir = model.pretrained_model_name_or_path;
  if (dir.empty()) throw Error("--pretrained_model_name_or_path is required");
  if (!is_directory(dir)) throw Error("--pretrained_model_name_or_path " + dir + ": not a snapshot directory");
  std::vector<std::string> prompts;
  if (!c.bench) {
    if (c.prompt.empty() == c.prompts_file.empty()) throw Error("give exactly one of --prompt or --prompts");
    prompts = c.prompt.empty() ? read_prompts_file(c.prompts_file) : std::vector<std::string>{c.prompt};
    if (prompts.empty()) throw Error("--prompts " + c.prompts_file + ": no prompts");
    if (prompts.size() > 1 && c.output_dir.empty()) throw Error("several prompts need --output_dir");
    if (c.output.empty() && c.output_dir.empty()) throw Error("--output (or --output_dir) is required");
    if (!c.output.empty() && prompts.size() > 1) throw Error("--output takes one image; use --output_dir");
  } else {
    prompts.assign(static_cast<size_t>(c.bench_prompts), "a photo");
  }
  if (!c.output.empty())
    check_output_file("--output", c.output,
                      {{"--lora", c.lora}, {"--prompts", c.prompts_file}, {"--text_encoder_lora", c.text_encoder_lora}});
  if (!c.text_encoder_lora.empty() && !path_exists(c.text_encoder_lora))
    throw Error("--text_encoder_lora " + c.text_encoder_lora + ": missing");
  if (!c.output_dir.empty()) check_output_dir("--output_dir", c.output_dir);
  if (!c.save_decoded.empty()) check_output_file("--save_decoded", c.save_decoded);
  if (!c.lora.empty() && !path_exists(c.lora)) throw Error("--lora " + c.lora + ": missing");
  for (const auto& f : c.subject_images)
    if (!path_exists(f)) throw Error("--subject_image " + f + ": missing");
  for (const auto& f : c.spatial_images)
    if (!path_exists(f)) throw Error("--spatial_image " + f + ": missing");

  RuntimeRequest rq;
  rq.device = model.device;
  if (model.device != "auto") parse_device(model.device, "--device");  // a clear error for a bad name
  if (c.dtype != "auto") rq.dtype = parse_dtype(c.dtype, "--dtype");
  Runtime rt = make_runtime(rq);
  if (c.dtype == "auto") rt.dtype = rt.device.is_cpu() ? at::kFloat : at::kBFloat16;
  configure_attention_backends();

  TransformerSource source;
  // Its errors say "loading transformer: ...".
  source = open_transformer(dir, model.model_layout, rt.dtype);
  const FluxConfig& cfg = source.config;
  std::unique_ptr<BlockWeights> weights = make_block_weights(rt, weight_source(source), {});
  if (!has_autoencoder(dir)) throw Error(dir + ": no autoencoder (ae.safetensors or vae/)");
  LoadedAutoencoder la = load_autoencoder(dir, "auto", rt.dtype);
  Autoencoder ae(la.config, std::move(la.weights));
  ae.to(at::TensorOptions().device(rt.device));

  const bool have_text = path_exists(path_join(dir, "text_encoder")) && path_exists(path_join(dir, "text_encoder_2"));
  std::unique_ptr<TextEncoders> text;
  if (have_text) {
    TextEncoderSetup ts;
    ts.snapshot_dir = dir;
    ts.dtype = rt.dtype;
    ts.device = rt.device;
    ts.max_sequence_length = c.max_sequence_length;
    text = std::make_unique<TextEncoders>(TextEncoders::load(ts));
  } else if (!c.bench) {
    throw Error(dir + ": no text encoders (text_encoder/ and text_encoder_2/ are needed for prompts)");
  }
  // The text encoders' LoRA: an explicit file, else text-encoder keys inside --lora (a kohya
  // file holds lora_te* beside lora_unet_*), so that pictures show everything a run trained.
  {
    const std::string& f = !c.text_encoder_lora.empty() ? c.text_encoder_lora : c.lora;
    const std::string flag = !c.text_encoder_lora.empty() ? "--text_encoder_lora" : "--lora";
    bool has_te_keys = !c.text_encoder_lora.empty();
    if (!has_te_keys && !f.empty() && text) {
      try {
        const safetensors::File file(f);
        for (const auto& kv : file.entries())
          if (kv.first.rfind("text_encoder", 0) == 0 || kv.first.rfind("lora_te", 0) == 0) has_te_keys = true;
      } catch (...) {
        rethrow_with_context(flag);
      }
    }
    if (has_te_keys && text) {
      try {
        TextEncoderLoraFile te = load_text_encoder_lora_file(f, text->clip() ? &text->clip()->config() : nullptr,
                                                             text->t5() ? &text->t5()->config() : nullptr,
                                                             c.text_encoder_alpha);
        text->set_lora(std::move(te.clip), std::move(te.t5));
      } catch (...) {
        rethrow_with_context(flag);
      }
    } else if (!c.text_encoder_lora.empty()) {
      throw Error("--text_encoder_lora needs the snapshot's text encoders (text_encoder/, text_encoder_2/)");
    }
  }

  LoraSet lora;
  const LoraSet* lora_ptr = nullptr;
  const int64_t n_conds = static_cast<int64_t>(c.subject_images.size() + c.spatial_images.size()) +
                          (c.bench ? c.bench_conditions : 0);
  if (!c.lora.empty()) {
    if (!path_exists(c.lora)) throw Error("--lora " + c.lora + ": missing");
    lora = load_lora_file(c.lora, cfg, c.network_alphas);
  } else if (c.bench && c.bench_conditions > 0) {
    LoraConfig lc;
    lc.lora_num = static_cast<int>(c.bench_conditions);
    lc.ranks.assign(static_cast<size_t>(c.bench_conditions), c.bench_lora_rank);
    lc.alphas.assign(static_cast<size_t>(c.bench_conditions), static_cast<double>(c.bench_lora_rank));
    lora = LoraSet::create(cfg, lc, 0);
  }
  if (!lora.empty()) {
    lora.to(at::TensorOptions().device(rt.device));
    lora_ptr = &lora;
    if (lora.config().mode == LoraMode::EasyControl) {
      if (n_conds > lora.config().lora_num)
        throw Error("--lora " + c.lora + " has adapters for " + std::to_string(lora.config().lora_num) +
                    " condition(s), but " + std::to_string(n_conds) + " condition images were given");
      if (n_conds == 0)
        std::cerr << "note: the EasyControl LoRA acts on condition tokens only; without --subject_image or "
                     "--spatial_image it changes nothing\n";
    }
  }

  SampleOptions o;
  o.height = c.height;
  o.width = c.width;
  o.steps = c.steps > 0 ? c.steps : (cfg.guidance_embed ? 28 : 4);
  o.guidance = c.guidance;
  o.seed = static_cast<uint64_t>(c.seed);
  o.batch = c.batch;
  o.cond_size = c.cond_size;
  o.kv_cache = !c.no_kv_cache;
  o.zero_init_steps = c.zero_init_steps;
  o.schedule = FlowSchedule::for_snapshot(dir, cfg);
  check_sample_options(o);

  SampleInputs in;
  for (const auto& f : c.subject_images)
    in.conditions.push_back({SampleCondition::Kind::Subject, load_image_rgb8(f), {}});
  for (const auto& f : c.spatial_images)
    in.conditions.push_back({SampleCondition::Kind::Spatial, load_image_rgb8(f), {}});
  if (c.bench)
    for (int64_t k = 0; k < c.bench_conditions; ++k) {
      const int64_t side = c.cond_size / ae.config().downscale();
      in.conditions.push_back({SampleCondition::Kind::Subject, {},
                               at::randn({ae.config().latent_channels, side, side}, at::TensorOptions().dtype(at::kFloat))});
    }
  if (!c.initial_latents.empty()) {
    safetensors::File f(c.initial_latents);
    if (!f.contains("latents")) throw Error("--initial_latents " + c.initial_latents + ": no tensor 'latents'");
    in.initial_latents = f.load("latents");
  }

  Sampler sampler({&cfg, weights.get(), lora_ptr, text.get(), &ae});
  TextConditioning bench_text;
  if (c.bench && !text) {
    // No encoders in the snapshot: T5 states and pooled vectors of the right shapes.
    const int64_t n = static_cast<int64_t>(prompts.size());
    bench_text.prompt_embeds = at::randn({n, c.max_sequence_length, cfg.context_in_dim});
    bench_text.pooled = at::randn({n, cfg.vec_in_dim});
  }
  auto run = [&](const SampleOptions& opt) {
    return bench_text.prompt_embeds.defined() ? sampler.sample(bench_text, opt, in) : sampler.sample(prompts, opt, in);
  };

  if (c.bench) {
    SampleOptions warm = o;
    warm.steps = 1;  // kernels, allocator and cuBLAS handles, without a full run
    warm.zero_init_steps = 0;
    run(warm);
    sync(rt.device);
    const int di = rt.device.index() < 0 ? 0 : rt.device.index();
    if (!rt.device.is_cpu()) at::accelerator::resetPeakStats(di);
    const auto t0 = std::chrono::steady_clock::now();
    const SampleResult r = run(o);
    sync(rt.device);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double peak = 0;
    if (!rt.device.is_cpu())
      peak = static_cast<double>(at::accelerator::getDeviceStats(di).allocated_bytes[0].peak) / (1ull << 30);
    nlohmann::json j = {{"name", "sample"},
                        {"device", device_name(rt.device)},
                        {"config", {{"height", o.height}, {"width", o.width}, {"steps", o.steps},
                                    {"batch", o.batch}, {"images", prompts.size()}, {"dtype", c10::toString(rt.dtype)},
                                    {"conditions", in.conditions.size()}, {"cond_size", o.cond_size},
                                    {"kv_cache", o.kv_cache}, {"guidance_embed", cfg.guidance_embed},
                                    {"text_encoders", text != nullptr}}},
                        {"s_per_image", secs / static_cast<double>(prompts.size())},
                        {"s_per_step", secs / static_cast<double>(o.steps * ((static_cast<int64_t>(prompts.size()) + o.batch - 1) / o.batch))},
                        {"peak_gib", peak},
                        {"kv_cache_gib", static_cast<double>(r.cache_bytes) / (1ull << 30)}};
    std::cout << j.dump() << std::endl;
    return 0;
  }

  const auto t0 = std::chrono::steady_clock::now();
  Progress* bar = nullptr;
  std::unique_ptr<Progress> holder;
  o.on_step = [&](int64_t done, int64_t total) {
    if (!bar) {
      holder = std::make_unique<Progress>(total, 0, stderr, -1, 1);
      bar = holder.get();
    }
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    bar->update(done, std::nan(""), 0, el / static_cast<double>(done));
  };
  const SampleResult r = run(o);
  if (bar) bar->finish();

  std::vector<std::string> written;
  if (!c.output_dir.empty()) make_directories(c.output_dir);
  for (int64_t i = 0; i < r.images.size(0); ++i) {
    const std::string path = !c.output.empty() ? c.output : path_join(c.output_dir, image_name(i));
    save_png(path, r.images[i]);
    written.push_back(path);
  }
  if (!c.save_decoded.empty())
    safetensors::save(c.save_decoded, {{"images", r.decoded.contiguous()}, {"latents", r.latents.contiguous()}});
  for (const auto& w : written) std::cout << w << "\n";
  return 0;
}

}  // namespace fluxtrain
