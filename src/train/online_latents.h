// Latents for datasets that store images (`prepare` without --cache_latents): the autoencoder
// encodes each micro-batch's pictures (target and conditions; subject augmentation already
// applied by the reader) before the transformer sees them, with encode_latents_online
// (data/online_vae.h). One process: here. Under mpirun only --encoder_process loads the
// autoencoder: it encodes the global batch and scatters each rank its samples' latents
// (dist/encoder_rank.h), as the text states are. No gradients: the autoencoder is frozen.
#pragma once
#include <memory>
#include <vector>

#include <c10/core/Device.h>

#include "dist/encoder_rank.h"
#include "encoders/autoencoder.h"

namespace fluxtrain {

struct Sample;

class OnlineLatents {
 public:
  // Tiles only images larger than 1024 px, as `prepare --cache_latents` does (autoencoder.h).
  static constexpr TileOptions kTile{1024, 256};

  // One process: the loaded autoencoder; comm stays null.
  explicit OnlineLatents(Autoencoder ae);
  // Under mpirun: ae loaded on encoder_rank, empty (not loaded) elsewhere.
  OnlineLatents(dist::Communicator& comm, int encoder_rank, Autoencoder ae);

  // Fills target / conds (float32, CPU) of the samples that hold pixels. Collective under mpirun:
  // every rank calls it once per micro-batch, with its own samples.
  void fill(std::vector<Sample>& samples);
  bool holds_autoencoder() const { return ae_.loaded(); }
  int64_t resident_bytes() const;  // the autoencoder's weights on this rank (0 when not held)

 private:
  Autoencoder ae_;
  std::unique_ptr<dist::EncoderRank> er_;
};

}  // namespace fluxtrain
