#include "dist/dist_options.h"

#include "core/options.h"

namespace fluxtrain {

void declare_options(OptionSet& s, DistConfig& c) {
  s.group("Distributed (mpirun -np N fluxtrain train ...; docs/distributed.md)", "distributed")
      .add("shard_weights", &c.shard_weights,
           "shard the frozen transformer blocks over the ranks (always on with more than one rank; "
           "with one rank: exercises the sharded path)")
      .add("shard_optimizer", &c.shard_optimizer,
           "reduce-scatter the LoRA gradients and keep each rank's 1/N of the AdamW state")
      .add("encoder_process", &c.encoder_rank,
           "MPI rank (process) that computes the conditioning of the global batch (old name: --encoder_rank)",
           rules::non_negative())
      .alias("encoder_rank")
      .add("nccl_timeout", &c.nccl_timeout, "seconds after which a stuck NCCL collective aborts the whole job",
           rules::positive_number("a positive number of seconds"))
      .add("mpi_timeout", &c.mpi_timeout,
           "seconds after which a stuck MPI collective (CPU runs, host values) aborts the whole job, naming the rank");
}

}  // namespace fluxtrain
