#include "train/encoder_process.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "dist/communicator.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "encoders/autoencoder_weights.h"
#include "encoders/t5_encoder.h"
#include "encoders/text_encoders.h"
#include "train/run_config.h"
#include "train/setup.h"
#include "train/text_conditioning.h"

namespace fluxtrain {

OnlineEncoding make_online_encoding(const RunConfig& cfg, const Runtime& rt, const DatasetInfo& data,
                                    at::ScalarType master) {
  OnlineEncoding o;
  const TextEncoderOptions& te = cfg.text_encoder;
  const bool text_online = te.needs_encoders() || !data.has_text_embeddings;
  const bool vae_online = data.storage == "pixels";
  const bool multi = rt.ctl_comm && rt.world_size > 1;
  const int er = static_cast<int>(cfg.dist.encoder_rank);
  const bool here = !multi || rt.rank == er;  // this process holds the encoders
  o.trains_text_encoder = te.needs_encoders();
  o.encoder_process = multi && o.trains_text_encoder;

  if (text_online) {
    std::unique_ptr<TextEncoders> enc;
    std::string t5_plan;  // the low-memory placement of T5, for the start line
    if (here) {
      const std::string& td = te.text_encoder_device;
      const c10::Device device = td.empty() ? rt.device : c10::Device(td);
      TextEncoderSetup s = TextEncoderSetup::for_training(cfg.model.pretrained_model_name_or_path, te, rt.dtype, device,
                                                          derive_seed(cfg.train.seed, RngPurpose::LoraInit, 1, 0),
                                                          cfg.model.gradient_checkpointing);
      s.load_clip = s.load_t5 = true;  // a dataset without embeddings needs both, LoRA or not
      // The low-memory options place T5 too (fp8 and/or streamed layers, train/setup.h).
      if (cfg.low_memory.fp8() || cfg.low_memory.streams())
        s.place_t5 = [&cfg, &t5_plan, device, &rt](T5Encoder& t5) {
          t5_plan = place_t5_low_memory(t5, cfg.low_memory, device, rt.dtype);
        };
      try {
        enc = std::make_unique<TextEncoders>(TextEncoders::load(s));
      } catch (...) {
        rethrow_with_context(te.train_text_encoder            ? "--train_text_encoder"
                             : te.train_text_encoder_one_only ? "--train_text_encoder_one_only"
                                                              : "--pretrained_model_name_or_path (text encoders for " +
                                                                    data.path + ", which has no cached embeddings)");
      }
      // Masters in the run's master dtype (float64 in exactness tests, like the transformer's).
      if (!enc->clip_lora_parameters().empty()) enc->clip_lora().to(device, master);
      if (!enc->t5_lora_parameters().empty()) enc->t5_lora().to(device, master);
    }
    const double lr_scale = te.text_encoder_lr / cfg.train.learning_rate;
    if (multi) {
      auto c = std::make_unique<EncoderProcessTextConditioning>(*rt.ctl_comm, er, std::move(enc), te.trains_clip(),
                                                                te.trains_t5());
      o.text_encoders = c->encoders();
      if (o.text_encoders) o.encoder_process_groups = text_encoder_param_groups(*o.text_encoders, lr_scale);
      o.conditioner = std::move(c);
    } else {
      auto c = std::make_unique<TextEncoderConditioning>(std::move(*enc), lr_scale);
      o.text_encoders = &c->encoders();
      o.conditioner = std::move(c);
    }
    o.description = std::string(te.needs_encoders() ? "text encoders with LoRA" : "frozen text encoders");
    if (!t5_plan.empty()) o.description += " (" + t5_plan + ")";
  } else {
    o.conditioner = std::make_unique<CachedTextConditioning>();
  }

  if (vae_online) {
    Autoencoder ae;
    if (here) {
      LoadedAutoencoder la;
      // float32 as `prepare --cache_latents` encodes by default (bf16 runs too: the latents are
      // the targets), float64 in float64 runs (exactness tests).
      const at::ScalarType ae_dtype = rt.dtype == at::kDouble ? at::kDouble : at::kFloat;
      try {
        la = load_autoencoder(cfg.model.pretrained_model_name_or_path, "auto", ae_dtype);
      } catch (...) {
        rethrow_with_context("--pretrained_model_name_or_path (the autoencoder for " + data.path +
                             ", which holds images, not latents)");
      }
      ae = Autoencoder(la.config, std::move(la.weights));
      ae.to(at::TensorOptions().device(rt.device).dtype(ae_dtype));
    }
    o.latents = multi ? std::make_unique<OnlineLatents>(*rt.ctl_comm, er, std::move(ae))
                      : std::make_unique<OnlineLatents>(std::move(ae));
    o.description += std::string(o.description.empty() ? "" : " and ") + "the autoencoder";
  }
  if (!o.description.empty())
    o.description = "encoding online: " + o.description +
                    (multi ? " on --encoder_process " + std::to_string(er) + " only" : std::string());
  return o;
}

std::vector<int64_t> encoder_weight_bytes_per_rank(const OnlineEncoding& o, dist::Communicator* ctl) {
  const int64_t mine = (o.text_encoders ? o.text_encoders->resident_bytes() : 0) +
                       (o.latents ? o.latents->resident_bytes() : 0);
  at::Tensor all = at::tensor({mine}, at::TensorOptions().dtype(at::kLong));
  if (ctl) all = ctl->all_gather(all).reshape({-1});
  std::vector<int64_t> out;
  for (int64_t r = 0; r < all.numel(); ++r) out.push_back(all[r].item<int64_t>());
  return out;
}

std::string encoder_weights_per_rank(const std::vector<int64_t>& bytes) {
  std::string line = "encoder weights per rank (bytes): ";
  for (size_t r = 0; r < bytes.size(); ++r) line += (r ? ", " : "") + std::to_string(bytes[r]);
  return line;
}

}  // namespace fluxtrain
