// fluxtrain train: LoRA training (src/train/trainer.h); options in src/train/run_config.h (each part declares its own: docs/architecture.md).
//
// Every `train` process is an MPI rank: under mpirun/srun one of many, started by hand a
// singleton (MPI_Init without a launcher), so that the single-GPU path needs no mpirun.
#include <iostream>
#include <sstream>

#include <ATen/Context.h>

#include "cli/commands.h"
#include "dist/mpi_watchdog.h"
#include "train/run_config.h"
#include "dist/process_group.h"
#include "train/trainer.h"

namespace fluxtrain {
namespace {

int train_main(dist::ProcessGroup& pg, int argc, char** argv) {
  const bool root = pg.rank() == 0;
  std::ostringstream sink;  // --help is printed by rank 0 only
  ParsedArgs a = parse_train_args(argc, argv, root ? static_cast<std::ostream&>(std::cout) : sink);
  if (a.help) return 0;
  RunConfig& cfg = a.config;
  dist::set_mpi_timeout(cfg.dist.mpi_timeout);
  if (pg.world_size() > 1) {
    // An unseeded run draws its seed on each rank: rank 0's wins, or the ranks would train on
    // different data orders, noise and LoRA initialisations.
    int64_t v[2] = {static_cast<int64_t>(cfg.train.seed), cfg.train.seed_given ? 1 : 0};
    MPI_Bcast(v, 2, MPI_INT64_T, 0, pg.world());
    cfg.train.seed = static_cast<uint64_t>(v[0]);
    cfg.train.seed_given = v[1] != 0;
  }
  TrainerOptions opt;
  opt.rank = pg.rank();
  opt.world_size = pg.world_size();
  const std::string& d = cfg.model.device;
  if (d == "cuda" || (d == "auto" && at::hasCUDA())) opt.cuda_device = pg.select_cuda_device().index();
  std::string lora;
  {
    Trainer trainer(cfg, opt);
    lora = trainer.run();
  }  // destroyed (communicators freed) before MPI is finalised
  if (root) std::cout << lora << "\n";  // last line: the LoRA file (the quickstart prints it)
  return 0;
}

}  // namespace

int cmd_train(int argc, char** argv) {
  dist::ProcessGroup& pg = dist::ProcessGroup::init(&argc, &argv);
  int rc = 0;
  try {
    // With several ranks an exception ends the whole job here ("rank R: reason", MPI_Abort);
    // on one rank it comes back to main, which prints it as for every other command.
    rc = dist::run_guarded([&] { return train_main(pg, argc, argv); });
  } catch (...) {
    dist::ProcessGroup::finalize();
    throw;
  }
  dist::ProcessGroup::finalize();
  return rc;
}

}  // namespace fluxtrain
