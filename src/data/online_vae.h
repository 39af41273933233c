// The VAE-online path: datasets prepared without --cache_latents hold images (uint8, already
// bucketed / resized; subject conditions augmented by the reader per (seed, epoch, sample)), and
// the trainer's conditioning step encodes them with this function, on the rank that holds the
// autoencoder (the encoder rank under mpirun), before the latents are scattered like cached ones.
#pragma once
#include <vector>

#include <c10/core/Device.h>

#include "data/dataset.h"
#include "encoders/autoencoder.h"

namespace fluxtrain {

// Fills s.target and s.conds (float32 on out_device, shifted and scaled like cached latents)
// from s.target_pixels / s.cond_pixels; samples that already have latents are left alone.
// Images of equal shape are encoded as one batch.
void encode_latents_online(const Autoencoder& ae, std::vector<Sample>& samples,
                           const TileOptions& tile = TileOptions::defaults(),
                           c10::Device out_device = c10::Device(c10::kCPU));

}  // namespace fluxtrain
