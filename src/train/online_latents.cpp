#include "train/online_latents.h"

#include <string>

#include "core/error.h"
#include "data/dataset.h"
#include "data/online_vae.h"

namespace fluxtrain {

OnlineLatents::OnlineLatents(Autoencoder ae) : ae_(std::move(ae)) {
  if (!ae_.loaded()) throw Error("online latents: no autoencoder", ErrorKind::Internal);
}

OnlineLatents::OnlineLatents(dist::Communicator& comm, int encoder_rank, Autoencoder ae)
    : ae_(std::move(ae)), er_(std::make_unique<dist::EncoderRank>(comm, encoder_rank, at::kCPU)) {
  if (er_->is_encoder() != ae_.loaded())
    throw Error("online latents: the autoencoder belongs on the encoder process only", ErrorKind::Internal);
}

int64_t OnlineLatents::resident_bytes() const {
  int64_t b = 0;
  for (const auto& kv : ae_.weights()) b += static_cast<int64_t>(kv.second.nbytes());
  return b;
}

void OnlineLatents::fill(std::vector<Sample>& samples) {
  if (!er_) {
    encode_latents_online(ae_, samples, kTile);
    return;
  }
  // Each sample travels as its pixels: "target" and "cond.<k>" (uint8), and comes back as latents
  // under the same keys.
  dist::SampleMaps in;
  for (const Sample& s : samples) {
    TensorMap m;
    if (!s.target.defined() && s.target_pixels.defined()) {
      m.emplace("target", s.target_pixels);
      for (size_t k = 0; k < s.cond_pixels.size(); ++k) m.emplace("cond." + std::to_string(k), s.cond_pixels[k]);
    }
    in.push_back(std::move(m));
  }
  const Autoencoder& ae = ae_;
  auto encode = [&ae](const dist::SampleMaps& global) {
    std::vector<Sample> batch(global.size());
    for (size_t i = 0; i < global.size(); ++i) {
      auto t = global[i].find("target");
      if (t == global[i].end()) continue;  // latents already there: nothing to encode
      batch[i].target_pixels = t->second;
      for (size_t k = 0;; ++k) {
        auto c = global[i].find("cond." + std::to_string(k));
        if (c == global[i].end()) break;
        batch[i].cond_pixels.push_back(c->second);
      }
    }
    encode_latents_online(ae, batch, kTile);
    dist::SampleMaps out(global.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      if (!batch[i].target.defined()) continue;
      out[i].emplace("target", batch[i].target);
      for (size_t k = 0; k < batch[i].conds.size(); ++k) out[i].emplace("cond." + std::to_string(k), batch[i].conds[k]);
    }
    return out;
  };
  const dist::SampleMaps got = er_->forward(in, encode, /*requires_grad=*/false);
  for (size_t i = 0; i < samples.size(); ++i) {
    auto t = got[i].find("target");
    if (t == got[i].end()) continue;
    samples[i].target = t->second;
    samples[i].conds.assign(samples[i].cond_pixels.size(), at::Tensor());
    for (size_t k = 0; k < samples[i].cond_pixels.size(); ++k)
      samples[i].conds[k] = got[i].at("cond." + std::to_string(k));
  }
}

}  // namespace fluxtrain
