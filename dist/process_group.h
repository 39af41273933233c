// The process group: MPI start-up, who we are (rank, world size, local rank on the node), which
// GPU we drive, and the one way out when something goes wrong on any rank.
//
// Failure rule: a rank that cannot continue calls fatal(), which prints "rank R: reason" on stderr
// and MPI_Abort's the whole job, so that no other rank is left waiting in a collective. MPI errors
// are fatal (MPI_ERRORS_ARE_FATAL on every communicator we use), never returned.
//
// Nothing here knows about FLUX; the model knows nothing about this file.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include <mpi.h>

#include <c10/core/Device.h>

namespace fluxtrain::dist {

class Communicator;

struct RankInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;   // index among the ranks on this node (shared-memory domain)
  int local_size = 1;   // ranks on this node
  int node_index = 0;   // which node (0..num_nodes-1), ordered by the lowest world rank on it
  int num_nodes = 1;
};

class ProcessGroup {
 public:
  // Initialises MPI (MPI_Init_thread, SERIALIZED) unless something already did (the test main),
  // derives the rank layout and cross-checks the local rank with the launcher's environment
  // (OMPI_COMM_WORLD_LOCAL_RANK, or SLURM_LOCALID when srun started this rank). Throws Error
  // when they disagree. Call once, early, from the main thread; later calls return the same group.
  static ProcessGroup& init(int* argc = nullptr, char*** argv = nullptr);
  // The group created by init(); throws when init() has not run.
  static ProcessGroup& get();
  static bool initialized();

  const RankInfo& info() const { return info_; }
  int rank() const { return info_.rank; }
  int world_size() const { return info_.world_size; }
  int local_rank() const { return info_.local_rank; }
  MPI_Comm world() const { return world_; }  // a duplicate of MPI_COMM_WORLD, errors fatal

  // Selects this rank's CUDA device: with one visible GPU (the launcher set CUDA_VISIBLE_DEVICES
  // per rank) device 0, otherwise device local_rank; throws when the node has more ranks than
  // GPUs. Must run before any CUDA allocation and before a NCCL communicator is created.
  // Returns the device; a CPU build throws Error.
  at::Device select_cuda_device();

  // A new communicator over all ranks for tensors on `device` (kCPU: MPI; kCUDA: NCCL with a
  // CPU/MPI fallback for host tensors). Each call makes an independent communicator, so that
  // parameter gathers and gradient reductions do not share one ordering. nccl_timeout_s: a
  // NCCL collective that has not completed after this long aborts the job through fatal().
  std::unique_ptr<Communicator> make_communicator(at::Device device, double nccl_timeout_s = 600.0);

  // Finalizes MPI if init() started it. Only for a clean exit on every rank.
  static void finalize();

 private:
  ProcessGroup() = default;
  RankInfo info_;
  MPI_Comm world_ = MPI_COMM_NULL;
  bool owns_mpi_ = false;
};

// Pure function behind the local-rank cross-check, testable without a launcher: returns an
// empty string when consistent, else the one-line reason. env_* are nullptr when unset.
std::string check_local_rank(int world_rank, int mpi_local_rank, const char* env_ompi_local_rank,
                             const char* env_slurm_localid, const char* env_slurm_procid);

// Prints "rank R: reason" to stderr and aborts every rank of the job (MPI_Abort with exit_code).
// Safe to call from any thread and before/after MPI is up (then it just exits).
[[noreturn]] void fatal(int rank, const std::string& reason, int exit_code = 1);
// fatal() with this process's rank (or -1 when MPI is not initialised).
[[noreturn]] void fatal(const std::string& reason, int exit_code = 1);

// Runs a rank's top-level body. Returns its result; an exception escaping it goes to fatal()
// when the job has more than one rank (exit code 2 for Error(BadInput), else 1), and is printed
// as one line and turned into that exit code on a single rank. Also installs a terminate
// handler so that an exception escaping another thread ends the whole job the same way.
int run_guarded(const std::function<int()>& body);

}  // namespace fluxtrain::dist
