#include "data/online_vae.h"

#include <map>

#include <ATen/ATen.h>

#include "core/error.h"

namespace fluxtrain {

void encode_latents_online(const Autoencoder& ae, std::vector<Sample>& samples, const TileOptions& tile,
                           c10::Device out_device) {
  if (!ae.loaded()) throw Error("encode_latents_online: no autoencoder loaded", ErrorKind::Internal);
  // Every image to encode, grouped by shape: (sample, column) with column -1 = target.
  std::map<std::vector<int64_t>, std::vector<std::pair<size_t, int64_t>>> groups;
  for (size_t i = 0; i < samples.size(); ++i) {
    Sample& s = samples[i];
    if (s.target.defined() || !s.target_pixels.defined()) continue;
    groups[s.target_pixels.sizes().vec()].push_back({i, -1});
    s.conds.assign(s.cond_pixels.size(), at::Tensor());
    for (size_t k = 0; k < s.cond_pixels.size(); ++k)
      groups[s.cond_pixels[k].sizes().vec()].push_back({i, static_cast<int64_t>(k)});
  }
  for (const auto& [shape, members] : groups) {
    std::vector<at::Tensor> imgs;
    for (const auto& [i, k] : members) imgs.push_back(k < 0 ? samples[i].target_pixels : samples[i].cond_pixels[k]);
    const at::Tensor x = at::stack(imgs).to(at::kFloat).div(127.5).sub(1.0);
    const at::Tensor z = ae.encode(x, tile).to(at::kFloat).to(out_device);
    for (size_t m = 0; m < members.size(); ++m) {
      const auto& [i, k] = members[m];
      (k < 0 ? samples[i].target : samples[i].conds[static_cast<size_t>(k)]) = z[static_cast<int64_t>(m)];
    }
  }
}

}  // namespace fluxtrain
