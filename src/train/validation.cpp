#include "train/validation.h"

#include <algorithm>
#include <cstdio>

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"
#include "data/image_io.h"
#include "dist/communicator.h"
#include "encoders/autoencoder.h"
#include "encoders/autoencoder_weights.h"
#include "encoders/text_encoders.h"
#include "model/flux_config.h"
#include "train/run_config.h"
#include "train/sampler.h"
#include "train/setup.h"

namespace fluxtrain {
namespace {

std::vector<std::string> given(const std::vector<std::string>& v) {
  std::vector<std::string> out;
  for (const auto& s : v)
    if (!s.empty() && s != "None") out.push_back(s);
  return out;
}

std::string step_image_path(const std::string& out, int64_t step, int64_t k) {
  char name[64];
  std::snprintf(name, sizeof(name), "step-%06lld-%02lld.png", static_cast<long long>(step), static_cast<long long>(k));
  return path_join(path_join(out, "validation"), name);
}

}  // namespace

ValidationImages::ValidationImages(const Context& c) : c_(c) {
  const ValidationConfig& v = c_.cfg->validation;
  enabled_ = !v.validation_prompt.empty() && v.validation_steps > 0;
  if (!enabled_) return;
  steps_ = v.validation_inference_steps > 0 ? v.validation_inference_steps : (c_.model->guidance_embed ? 28 : 4);
  check_input(v.test_h % 16 == 0 && v.test_w % 16 == 0, "--test_h and --test_w must be multiples of 16");

  const std::vector<std::string> subjects = given(v.subject_test_images), spatials = given(v.spatial_test_images);
  const bool easycontrol = c_.cfg->lora.mode == LoraMode::EasyControl;
  const int64_t n_conds = static_cast<int64_t>(subjects.size() + spatials.size());
  if (easycontrol && n_conds != c_.cfg->lora.lora_num)
    throw Error("--subject_test_images / --spatial_test_images: " + std::to_string(n_conds) +
                " condition image(s) given, but the LoRA has --lora_num " + std::to_string(c_.cfg->lora.lora_num) +
                " condition(s): give one image per condition (subject ones first)");
  if (!easycontrol && n_conds > 0)
    throw Error("--subject_test_images / --spatial_test_images: a standard-mode LoRA has no condition branch");
  for (const auto& f : subjects) check_input(path_exists(f), "--subject_test_images " + f + ": missing");
  for (const auto& f : spatials) check_input(path_exists(f), "--spatial_test_images " + f + ": missing");

  // The autoencoder on rank 0: condition images in, pictures out.
  const std::string& dir = c_.cfg->model.pretrained_model_name_or_path;
  if (c_.rank == 0) {
    LoadedAutoencoder la;
    try {
      la = load_autoencoder(dir, "auto", c_.rt->dtype);
    } catch (...) {
      rethrow_with_context("--validation_prompt (validation images need the autoencoder of " + dir + ")");
    }
    vae_ = std::make_unique<Autoencoder>(la.config, std::move(la.weights));
    vae_->to(at::TensorOptions().device(c_.rt->device).dtype(c_.rt->dtype));
  }
  // Condition latents: encoded on rank 0, the same on every rank.
  auto add = [&](const std::string& f, bool subject) {
    at::Tensor lat;
    if (c_.rank == 0) {
      SampleCondition sc;
      sc.kind = subject ? SampleCondition::Kind::Subject : SampleCondition::Kind::Spatial;
      try {
        sc.image = load_image_rgb8(f);
      } catch (...) {
        rethrow_with_context(subject ? "--subject_test_images" : "--spatial_test_images");
      }
      lat = condition_latents(*vae_, sc, c_.cfg->data.cond_size).contiguous();
    }
    cond_latents_.push_back(share(lat, 0));
    cond_is_subject_.push_back(subject);
  };
  for (const auto& f : subjects) add(f, true);
  for (const auto& f : spatials) add(f, false);

  if (c_.run_has_text) {
    // Frozen encoders: the states never change, encode once.
    if (!c_.text_trains) encode_prompt(c_.text);
    return;
  }
  // No text encoders in the run: load them once on rank 0, encode, free them.
  std::unique_ptr<TextEncoders> enc;
  if (c_.rank == 0) {
    TextEncoderSetup s;
    s.snapshot_dir = dir;
    s.dtype = c_.rt->dtype;
    const std::string& td = c_.cfg->text_encoder.text_encoder_device;
    const bool low_memory = c_.cfg->low_memory.fp8() || c_.cfg->low_memory.streams();
    s.device = !td.empty() ? c10::Device(td) : low_memory ? c10::Device(at::kCPU) : c_.rt->device;
    if (s.device.is_cpu() && s.dtype == at::kBFloat16) s.dtype = at::kFloat;  // CPU kernels of bf16 are slow
    s.max_sequence_length = c_.cfg->text_encoder.max_sequence_length;
    try {
      enc = std::make_unique<TextEncoders>(TextEncoders::load(s));
    } catch (...) {
      rethrow_with_context("--validation_prompt (the text encoders of " + dir + ")");
    }
  }
  encode_prompt(enc.get());
}

ValidationImages::~ValidationImages() = default;

bool ValidationImages::due(int64_t step, int64_t max_steps) const {
  const int64_t vs = c_.cfg->validation.validation_steps;
  return enabled_ && vs > 0 && step > 0 && (step % vs == 0 || step == max_steps);
}

at::Tensor ValidationImages::share(const at::Tensor& t, int root) const {
  if (c_.world_size <= 1 || !c_.rt->ctl_comm) return t;
  dist::Communicator& comm = *c_.rt->ctl_comm;
  if (comm.rank() == root) return comm.scatter(std::vector<at::Tensor>(static_cast<size_t>(comm.size()), t), root);
  return comm.scatter({}, root);
}

void ValidationImages::encode_prompt(TextEncoders* local) {
  const int holder = c_.run_has_text ? c_.text_rank : 0;
  at::Tensor states, pooled;
  if (c_.rank == holder || c_.world_size <= 1) {
    if (!local) throw Error("validation: no text encoders on the rank that should hold them", ErrorKind::Internal);
    at::NoGradGuard ng;
    const TextEncoding e = local->encode({c_.cfg->validation.validation_prompt});
    states = e.prompt_embeds.to(at::kCPU, at::kFloat).contiguous();
    pooled = e.pooled_prompt_embeds.to(at::kCPU, at::kFloat).contiguous();
  }
  prompt_embeds_ = share(states, holder);
  pooled_ = share(pooled, holder);
}

at::Tensor ValidationImages::draw(int64_t step, BlockWeights& weights, const LoraSet& lora,
                                  std::vector<std::string>* written) {
  if (!enabled_) return {};
  if (c_.text_trains) encode_prompt(c_.text);  // the LoRA has moved since the last validation
  const ValidationConfig& v = c_.cfg->validation;
  const int64_t N = v.num_validation_images, W = c_.world_size;
  const int64_t per_rank = (N + W - 1) / W;

  SampleOptions o;
  o.height = v.test_h;
  o.width = v.test_w;
  o.steps = steps_;
  o.guidance = v.validation_guidance_scale;
  o.seed = c_.cfg->train.seed;
  o.batch = 1;
  o.cond_size = c_.cfg->data.cond_size;
  o.schedule = FlowSchedule::for_snapshot(c_.cfg->model.pretrained_model_name_or_path, *c_.model);
  Sampler sampler({c_.model, &weights, &lora, nullptr, nullptr});
  SampleInputs in;
  for (size_t n = 0; n < cond_latents_.size(); ++n) {
    SampleCondition sc;
    sc.kind = cond_is_subject_[n] ? SampleCondition::Kind::Subject : SampleCondition::Kind::Spatial;
    sc.latents = cond_latents_[n];
    in.conditions.push_back(sc);
  }
  // Image k on rank k mod W; the same number of transformer calls on every rank.
  std::vector<at::Tensor> mine;
  for (int64_t j = 0; j < per_rank; ++j) {
    const int64_t k = std::min<int64_t>(c_.rank + j * W, N - 1);  // past N: a spare copy, dropped
    in.first_index = k;
    const SampleResult r = sampler.sample(TextConditioning{prompt_embeds_, pooled_}, o, in);
    mine.push_back(r.latents);
  }
  at::Tensor lat = at::cat(mine, 0).contiguous();  // [per_rank, C, h, w]
  std::vector<at::Tensor> parts{lat};
  if (W > 1 && c_.rt->ctl_comm) parts = c_.rt->ctl_comm->gather(lat, 0);
  if (c_.rank != 0) return {};

  // Rank r's row j is image r + j W.
  std::vector<at::Tensor> ordered(static_cast<size_t>(N));
  for (int64_t r = 0; r < W; ++r)
    for (int64_t j = 0; j < per_rank; ++j) {
      const int64_t k = r + j * W;
      if (k < N) ordered[static_cast<size_t>(k)] = parts[static_cast<size_t>(r)][j];
    }
  std::vector<at::Tensor> imgs;
  for (const auto& l : ordered) imgs.push_back(decoded_to_images(decode_latents(*vae_, l.unsqueeze(0)))[0]);
  at::Tensor images = at::stack(imgs);
  const std::string& out = c_.cfg->checkpoint.output_dir;
  make_directories(path_join(out, "validation"));
  for (int64_t k = 0; k < N; ++k) {
    const std::string p = step_image_path(out, step, k);
    save_png(p, images[k]);  // atomic
    if (written) written->push_back(p);
  }
  return images;
}

}  // namespace fluxtrain
