// Options of the distributed run (docs/distributed.md).
#pragma once
#include <cstdint>

namespace fluxtrain {

class OptionSet;

struct DistConfig {
  bool shard_weights = false;    // FSDP-style frozen blocks (always on with > 1 rank)
  bool shard_optimizer = false;  // reduce-scattered gradients, AdamW state split over ranks
  // The MPI rank (process) that encodes the conditioning: --encoder_process (old name
  // --encoder_rank, easily confused with the LoRA ranks --ranks / --text_encoder_rank).
  int64_t encoder_rank = 0;
  double nccl_timeout = 600;     // seconds before a stuck NCCL collective aborts the job
  double mpi_timeout = 600;      // the same for MPI (CPU) collectives
};

void declare_options(OptionSet& s, DistConfig& c);

}  // namespace fluxtrain
