// Pictures out: FLUX.1 sampling with the flow-matching Euler schedule of diffusers' FluxPipeline
// (docs/sampling.md derives every formula), EasyControl conditions, and the condition KV cache.
//
//   Sampler s({&cfg, &weights, &lora_or_null, &text_encoders_or_null, &autoencoder});
//   SampleOptions o; o.height = o.width = 512; o.steps = 28; o.guidance = 3.5; o.seed = 7;
//   o.schedule = FlowSchedule::for_model(cfg);
//   SampleResult r = s.sample(prompts, o);          // or s.sample(TextConditioning{...}, o)
//   r.images: [N, H, W, 3] uint8 (CPU)
//
// Noise: image k (k = SampleInputs::first_index + row) starts from N(0, 1) float32 latents drawn on
// the CPU from a generator seeded with (seed, Validation, 0, k): the same picture for the same
// (seed, k) at every training step, on every device, rank count and batch size.
//
// Sharded weights: flux_forward acquires every block in order, and a sharded provider all-gathers
// each block with a collective. Every rank must therefore make the same sequence of forward calls:
// call sample() on every rank with the same number of images, the same batch size and the same
// steps (the prompts, conditions and seeds may differ per rank; the shapes may not matter to the
// gather, but the number of calls does). Text encoding and VAE decoding run locally (no
// collectives). The KV cache changes no call count: the first step records, later steps reuse.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>

#include "train/conditioning.h"

namespace fluxtrain {

struct FluxConfig;
class BlockWeights;
class LoraSet;
class TextEncoders;
class Autoencoder;

// The sigma schedule (diffusers' FlowMatchEulerDiscreteScheduler configuration, as FluxPipeline
// drives it): sigmas = linspace(1, 1/N, N), shifted, then a final 0.
//   dynamic: sigma' = e^mu / (e^mu + (1/sigma - 1)), mu linear in the image token count
//            (base_shift at base_seq_len tokens, max_shift at max_seq_len) -- FLUX.1-dev;
//   static:  sigma' = shift * sigma / (1 + (shift - 1) * sigma) -- FLUX.1-schnell with shift 1.
struct FlowSchedule {
  bool dynamic_shift = true;
  double base_shift = 0.5, max_shift = 1.15;
  int64_t base_seq_len = 256, max_seq_len = 4096;
  double shift = 1.0;

  // dev (guidance embedding): dynamic shifting; schnell: none. What the two scheduler configs say.
  static FlowSchedule for_model(const FluxConfig& cfg);
  // A diffusers scheduler_config.json (missing keys take diffusers' defaults).
  static FlowSchedule from_scheduler_json(const nlohmann::json& j, const std::string& file);
  // <dir>/scheduler/scheduler_config.json when the snapshot has one, else for_model(cfg).
  static FlowSchedule for_snapshot(const std::string& dir, const FluxConfig& cfg);

  double mu(int64_t image_tokens) const;
  // steps + 1 values, the last 0.
  std::vector<double> sigmas(int64_t steps, int64_t image_tokens) const;
};

struct SampleOptions {
  int64_t height = 1024, width = 1024;  // pixels, multiples of 16
  int64_t steps = 28;
  double guidance = 3.5;                // guidance-embedding (dev) models only
  uint64_t seed = 0;
  int64_t batch = 1;                    // images per transformer call
  int64_t cond_size = 512;              // condition images are resized to this, as in training
  bool kv_cache = true;                 // condition KV cache (no effect without conditions)
  // The first n steps leave the latents unchanged (velocity taken as 0): EasyControl's pipeline
  // does this for one step by default (use_zero_init); FluxPipeline does not (0).
  int64_t zero_init_steps = 0;
  FlowSchedule schedule;
  // Called after every transformer call: (calls done, calls in total).
  std::function<void(int64_t, int64_t)> on_step;
};

// An EasyControl condition: an image prepared as `prepare` prepares the training data (subject:
// resized and padded to cond_size, no augmentation; spatial: resized to cond_size x cond_size),
// then encoded by the autoencoder. Or its latents directly ([C, h, w], scaled as the transformer
// sees them; e.g. from a dataset), then no autoencoder is needed for it. Condition n uses the
// LoRA's adapters of condition n.
struct SampleCondition {
  enum class Kind { Subject, Spatial };
  Kind kind = Kind::Subject;
  at::Tensor image;    // [H, W, 3] uint8, or
  at::Tensor latents;  // [C, h, w]
};

struct SampleInputs {
  std::vector<SampleCondition> conditions;  // shared by every image
  // [N, C, h, w] starting latents (before packing, as diffusers' randn draws them); undefined:
  // drawn from the seed per image index (see the top of this file).
  at::Tensor initial_latents;
  int64_t first_index = 0;                  // image index of row 0, for the per-image seeds
};

struct SampleResult {
  at::Tensor images;   // [N, H, W, 3] uint8, CPU
  at::Tensor decoded;  // [N, 3, H, W] float32 autoencoder output (about [-1, 1], unclamped), CPU
  at::Tensor latents;  // [N, C, h, w] final latents (scaled as the transformer sees them), CPU
  int64_t cache_bytes = 0;  // largest condition KV cache held
};

// What the sampler runs. text may be null when the conditioning comes precomputed; the
// autoencoder is needed to decode and for conditions given as images.
struct SamplerModels {
  const FluxConfig* cfg = nullptr;
  BlockWeights* weights = nullptr;
  const LoraSet* lora = nullptr;
  TextEncoders* text = nullptr;
  const Autoencoder* vae = nullptr;
};

class Sampler {
 public:
  explicit Sampler(SamplerModels m);
  // One image per prompt, through the text encoders (no gradients).
  SampleResult sample(const std::vector<std::string>& prompts, const SampleOptions& o,
                      const SampleInputs& in = {});
  // One image per row of precomputed conditioning (T5 states [N, T, 4096], pooled [N, 768]).
  SampleResult sample(const TextConditioning& text, const SampleOptions& o, const SampleInputs& in = {});

  // The denoising loop alone, for tests: packed latents [B, L, 4C] at sigma 1 -> at sigma 0.
  // conds: packed condition latents with their position ids (as FluxInputs takes them).
  at::Tensor denoise(const TextConditioning& text, at::Tensor packed, int64_t lat_h, int64_t lat_w,
                     const std::vector<at::Tensor>& conds, const std::vector<at::Tensor>& cond_ids,
                     const SampleOptions& o, int64_t* cache_bytes = nullptr, int64_t calls_before = 0,
                     int64_t calls_total = 0);

 private:
  SamplerModels m_;
};

// Checks the size (positive multiples of 16), steps and batch; errors name the flags.
void check_sample_options(const SampleOptions& o);

}  // namespace fluxtrain
