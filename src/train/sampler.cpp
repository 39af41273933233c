#include "train/sampler.h"

#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/rng.h"
#include "data/augment.h"
#include "data/image_io.h"
#include "encoders/autoencoder.h"
#include "encoders/text_encoders.h"
#include "model/block_weights.h"
#include "model/condition_cache.h"
#include "model/flux_config.h"
#include "model/flux_transformer.h"
#include "model/lora.h"
#include "model/position_ids.h"
#include "train/flow_matching.h"

namespace fluxtrain {

// ---- schedule ----

FlowSchedule FlowSchedule::for_model(const FluxConfig& cfg) {
  FlowSchedule s;
  s.dynamic_shift = cfg.guidance_embed;  // FLUX.1-dev's scheduler shifts; schnell's does not
  s.shift = 1.0;
  return s;
}

FlowSchedule FlowSchedule::from_scheduler_json(const nlohmann::json& j, const std::string& file) {
  FlowSchedule s;
  try {
    s.dynamic_shift = j.value("use_dynamic_shifting", false);
    s.base_shift = j.value("base_shift", 0.5);
    s.max_shift = j.value("max_shift", 1.15);
    s.base_seq_len = j.value("base_image_seq_len", int64_t{256});
    s.max_seq_len = j.value("max_image_seq_len", int64_t{4096});
    s.shift = j.value("shift", 1.0);
    // Options of the scheduler that change the sigmas and that fluxtrain does not implement.
    for (const char* k : {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                          "stochastic_sampling"})
      if (j.value(k, false)) throw Error(file + ": " + k + " is not supported by fluxtrain's sampler");
    if (j.contains("shift_terminal") && !j["shift_terminal"].is_null())
      throw Error(file + ": shift_terminal is not supported by fluxtrain's sampler");
    if (j.value("time_shift_type", std::string("exponential")) != "exponential")
      throw Error(file + ": only time_shift_type exponential is supported");
  } catch (const nlohmann::json::exception& e) {
    throw Error(file + ": bad scheduler config (" + std::string(e.what()) + ")");
  }
  if (s.max_seq_len == s.base_seq_len) throw Error(file + ": max_image_seq_len equals base_image_seq_len");
  return s;
}

FlowSchedule FlowSchedule::for_snapshot(const std::string& dir, const FluxConfig& cfg) {
  const std::string f = dir + "/scheduler/scheduler_config.json";
  if (!path_exists(f)) return for_model(cfg);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(f));
  } catch (const nlohmann::json::exception& e) {
    throw Error(f + ": not JSON (" + std::string(e.what()) + ")");
  }
  return from_scheduler_json(j, f);
}

double FlowSchedule::mu(int64_t image_tokens) const {
  const double m = (max_shift - base_shift) / static_cast<double>(max_seq_len - base_seq_len);
  return base_shift + m * static_cast<double>(image_tokens - base_seq_len);
}

std::vector<double> FlowSchedule::sigmas(int64_t steps, int64_t image_tokens) const {
  check_input(steps >= 1, "sampling needs at least one step");
  std::vector<double> s(static_cast<size_t>(steps) + 1, 0.0);
  const double e = std::exp(mu(image_tokens));
  for (int64_t i = 0; i < steps; ++i) {
    // linspace(1, 1/N, N): endpoints exact, N = 1 gives just 1.
    const double t = steps == 1 ? 1.0 : 1.0 + (1.0 / steps - 1.0) * static_cast<double>(i) / (steps - 1);
    s[static_cast<size_t>(i)] = dynamic_shift ? e / (e + (1.0 / t - 1.0)) : shift * t / (1.0 + (shift - 1.0) * t);
  }
  return s;
}

void check_sample_options(const SampleOptions& o) {
  check_input(o.height >= 16 && o.height % 16 == 0, "--height must be a positive multiple of 16, got " +
                                                        std::to_string(o.height));
  check_input(o.width >= 16 && o.width % 16 == 0, "--width must be a positive multiple of 16, got " +
                                                      std::to_string(o.width));
  check_input(o.steps >= 1, "--num_inference_steps must be at least 1");
  check_input(o.batch >= 1, "--batch_size must be at least 1");
  check_input(o.cond_size >= 16 && o.cond_size % 16 == 0, "--cond_size must be a positive multiple of 16");
  check_input(std::isfinite(o.guidance), "--guidance_scale must be finite");
  check_input(o.zero_init_steps >= 0 && o.zero_init_steps <= o.steps, "--zero_init_steps must be in [0, steps]");
}

// ---- sampler ----

namespace {

struct Target {
  c10::Device device{c10::kCPU};
  at::ScalarType dtype = at::kFloat;  // the transformer's compute dtype
  at::ScalarType mix = at::kFloat;    // latents between steps (float32; float64 in float64 runs)
};

Target target_of(BlockWeights& w) {
  const at::Tensor& t = w.globals().at("img_in.weight");
  Target r;
  r.device = t.device();
  r.dtype = t.scalar_type();
  r.mix = r.dtype == at::kDouble ? at::kDouble : at::kFloat;
  return r;
}

at::Tensor initial_noise(int64_t channels, int64_t h, int64_t w, uint64_t seed, int64_t index) {
  auto gen = cpu_generator(derive_seed(seed, RngPurpose::Validation, 0, static_cast<uint64_t>(index)));
  return at::randn({channels, h, w}, gen, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

Sampler::Sampler(SamplerModels m) : m_(m) {
  check_input(m_.cfg && m_.weights, "sampler: the transformer config and weights are required");
}

at::Tensor Sampler::denoise(const TextConditioning& text, at::Tensor packed, int64_t lat_h, int64_t lat_w,
                            const std::vector<at::Tensor>& conds, const std::vector<at::Tensor>& cond_ids,
                            const SampleOptions& o, int64_t* cache_bytes, int64_t calls_before,
                            int64_t calls_total) {
  const Target tg = target_of(*m_.weights);
  const auto opts = at::TensorOptions().device(tg.device).dtype(tg.dtype);
  const int64_t B = packed.size(0);
  const std::vector<double> sigmas = o.schedule.sigmas(o.steps, packed.size(1));

  FluxInputs in;
  in.img_ids = noise_position_ids(lat_h / 2, lat_w / 2).to(tg.device);
  in.txt = text.prompt_embeds.to(opts);
  in.txt_ids = text_position_ids(in.txt.size(1)).to(tg.device);
  in.y = text.pooled.to(opts);
  in.guidance = at::full({B}, o.guidance, at::TensorOptions().dtype(tg.mix)).to(tg.device);
  for (size_t n = 0; n < conds.size(); ++n) {
    in.cond.push_back(conds[n].to(opts));
    in.cond_ids.push_back(cond_ids[n].to(tg.device));
  }
  ConditionCache cache;
  ForwardOptions fo;
  if (o.kv_cache && !conds.empty()) fo.condition_cache = &cache;

  at::Tensor x = packed.to(tg.device, tg.mix);
  for (int64_t i = 0; i < o.steps; ++i) {
    const double s = sigmas[static_cast<size_t>(i)], s_next = sigmas[static_cast<size_t>(i) + 1];
    in.img = x.to(tg.dtype);
    in.timesteps = at::full({B}, s, at::TensorOptions().dtype(tg.mix)).to(tg.device);
    const at::Tensor v = flux_forward(*m_.cfg, *m_.weights, m_.lora, in, fo);
    // Euler step of the flow ODE dx/dsigma = v, in float32 (float64) whatever the model dtype.
    if (i >= o.zero_init_steps) x = x + (s_next - s) * v.to(tg.mix);
    if (cache_bytes && cache.filled()) *cache_bytes = std::max(*cache_bytes, cache.bytes());
    if (o.on_step) o.on_step(calls_before + i + 1, calls_total > 0 ? calls_total : o.steps);
  }
  return x;
}

SampleResult Sampler::sample(const std::vector<std::string>& prompts, const SampleOptions& o,
                             const SampleInputs& in) {
  check_input(m_.text != nullptr, "sampler: prompts need the text encoders");
  check_input(m_.text->has_clip() && m_.text->has_t5(), "sampler: prompts need both CLIP and T5 weights");
  check_input(!prompts.empty(), "sampler: no prompts");
  TextConditioning t;
  {
    at::NoGradGuard ng;
    std::vector<at::Tensor> states, pooled;
    // Encoded in chunks of the sampling batch, so a long prompt file never sits in T5 at once.
    for (size_t r = 0; r < prompts.size(); r += static_cast<size_t>(o.batch)) {
      const size_t e = std::min(prompts.size(), r + static_cast<size_t>(o.batch));
      const std::vector<std::string> part(prompts.begin() + static_cast<std::ptrdiff_t>(r),
                                          prompts.begin() + static_cast<std::ptrdiff_t>(e));
      TextEncoding enc = m_.text->encode(part);
      states.push_back(enc.prompt_embeds);
      pooled.push_back(enc.pooled_prompt_embeds);
    }
    t.prompt_embeds = at::cat(states, 0);
    t.pooled = at::cat(pooled, 0);
  }
  return sample(t, o, in);
}

SampleResult Sampler::sample(const TextConditioning& text, const SampleOptions& o, const SampleInputs& in) {
  check_sample_options(o);
  const FluxConfig& cfg = *m_.cfg;
  check_input(text.prompt_embeds.defined() && text.prompt_embeds.dim() == 3 && text.pooled.defined() &&
                  text.pooled.dim() == 2 && text.pooled.size(0) == text.prompt_embeds.size(0),
              "sampler: text conditioning must be prompt_embeds [N, T, D] and pooled [N, D]");
  at::NoGradGuard ng;
  const int64_t N = text.prompt_embeds.size(0);
  check_input(N >= 1, "sampler: no images asked for (empty text conditioning)");
  const int64_t down = m_.vae ? m_.vae->config().downscale() : 8;
  check_input(o.height % (2 * down) == 0 && o.width % (2 * down) == 0,
              "--height and --width must be multiples of " + std::to_string(2 * down));
  const int64_t lat_h = o.height / down, lat_w = o.width / down, C = cfg.in_channels / 4;
  if (in.initial_latents.defined()) {
    const auto& l = in.initial_latents;
    check_input(l.dim() == 4 && l.size(0) == N && l.size(1) == C && l.size(2) == lat_h && l.size(3) == lat_w,
                "initial latents must be [" + std::to_string(N) + ", " + std::to_string(C) + ", " +
                    std::to_string(lat_h) + ", " + std::to_string(lat_w) + "] for these prompts and this size");
  }

  // Conditions: latents once, shared by every batch.
  std::vector<at::Tensor> conds, cond_ids;
  for (size_t n = 0; n < in.conditions.size(); ++n) {
    const SampleCondition& c = in.conditions[n];
    at::Tensor lat;
    if (c.latents.defined()) {
      lat = c.latents.unsqueeze(0).to(at::kFloat);
    } else {
      check_input(c.image.defined(), "condition " + std::to_string(n) + ": neither image nor latents");
      check_input(m_.vae != nullptr, "sampler: condition images need the autoencoder");
      const at::Tensor px = c.kind == SampleCondition::Kind::Subject ? subject_condition(c.image, o.cond_size, nullptr)
                                                                     : spatial_condition(c.image, o.cond_size);
      const at::Tensor& w0 = m_.vae->weights().begin()->second;
      lat = m_.vae->encode(rgb8_to_unit(px).unsqueeze(0).to(w0.device(), w0.scalar_type()));
    }
    check_input(lat.dim() == 4 && lat.size(1) == C && lat.size(2) % 2 == 0 && lat.size(3) % 2 == 0,
                "condition " + std::to_string(n) + ": latents must be [" + std::to_string(C) + ", h, w], h and w even");
    const int64_t ch = lat.size(2) / 2, cw = lat.size(3) / 2;
    conds.push_back(pack_latents(lat));
    cond_ids.push_back(c.kind == SampleCondition::Kind::Subject
                           ? subject_position_ids(ch, cw)
                           : spatial_position_ids(ch, cw, lat_h / 2, lat_w / 2));
  }

  SampleResult res;
  std::vector<at::Tensor> decoded, latents;
  const int64_t chunks = (N + o.batch - 1) / o.batch;
  for (int64_t r = 0; r < N; r += o.batch) {
    const int64_t b = std::min(o.batch, N - r);
    std::vector<at::Tensor> noise;
    for (int64_t k = 0; k < b; ++k)
      noise.push_back(in.initial_latents.defined() ? in.initial_latents[r + k].to(at::kFloat)
                                                   : initial_noise(C, lat_h, lat_w, o.seed, in.first_index + r + k));
    std::vector<at::Tensor> cb;
    for (const auto& c : conds) cb.push_back(c.expand({b, c.size(1), c.size(2)}));
    TextConditioning tb{text.prompt_embeds.narrow(0, r, b), text.pooled.narrow(0, r, b)};
    const at::Tensor x = denoise(tb, pack_latents(at::stack(noise)), lat_h, lat_w, cb, cond_ids, o,
                                 &res.cache_bytes, (r / o.batch) * o.steps, chunks * o.steps);
    const at::Tensor lat = unpack_latents(x, lat_h, lat_w);
    latents.push_back(lat.to(at::kCPU, at::kFloat));
    if (m_.vae) {
      const at::Tensor& w0 = m_.vae->weights().begin()->second;
      decoded.push_back(m_.vae->decode(lat.to(w0.device(), w0.scalar_type())).to(at::kCPU, at::kFloat));
    }
  }
  res.latents = at::cat(latents, 0);
  if (!decoded.empty()) {
    res.decoded = at::cat(decoded, 0);
    std::vector<at::Tensor> imgs;
    for (int64_t i = 0; i < N; ++i) imgs.push_back(unit_to_rgb8(res.decoded[i]));
    res.images = at::stack(imgs);
  }
  return res;
}

}  // namespace fluxtrain
