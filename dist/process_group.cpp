#include "dist/process_group.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <thread>

#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/detail.h"
#include "dist/mpi_watchdog.h"
#include "core/limits.h"

namespace fluxtrain::dist {

namespace {

ProcessGroup* g_group = nullptr;

int parse_int(const char* s, int fallback) {
  if (!s || !*s) return fallback;
  char* end = nullptr;
  long v = std::strtol(s, &end, 10);
  return (end && *end == '\0') ? static_cast<int>(v) : fallback;
}

}  // namespace

std::string check_local_rank(int world_rank, int mpi_local_rank, const char* env_ompi_local_rank,
                             const char* env_slurm_localid, const char* env_slurm_procid) {
  if (env_ompi_local_rank && *env_ompi_local_rank) {
    int v = parse_int(env_ompi_local_rank, -1);
    if (v != mpi_local_rank)
      return "local rank from MPI's shared-memory split is " + std::to_string(mpi_local_rank) +
             " but OMPI_COMM_WORLD_LOCAL_RANK=" + env_ompi_local_rank;
  }
  // SLURM_LOCALID describes this process only when srun started it as this rank. Under mpirun
  // inside an allocation every process inherits the batch step's SLURM_LOCALID/PROCID (0), so
  // the variables are only trusted when SLURM_PROCID names this very rank.
  if (env_slurm_localid && *env_slurm_localid && env_slurm_procid &&
      parse_int(env_slurm_procid, -1) == world_rank) {
    int v = parse_int(env_slurm_localid, -1);
    if (v != mpi_local_rank)
      return "local rank from MPI's shared-memory split is " + std::to_string(mpi_local_rank) +
             " but SLURM_LOCALID=" + env_slurm_localid +
             " (are the ranks of one node split over several srun steps?)";
  }
  return {};
}

bool ProcessGroup::initialized() { return g_group != nullptr; }

ProcessGroup& ProcessGroup::get() {
  if (!g_group) throw Error("distributed: ProcessGroup::init() has not been called", ErrorKind::Internal);
  return *g_group;
}

ProcessGroup& ProcessGroup::init(int* argc, char*** argv) {
  if (g_group) return *g_group;
  auto* pg = new ProcessGroup();
  int already = 0;
  MPI_Initialized(&already);
  if (!already) {
    // SERIALIZED: the CUDA autograd engine may run backward (and with it block re-acquisition)
    // on its own thread; we never call MPI from two threads at once.
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided);
    pg->owns_mpi_ = true;
  }
  // A failing MPI call must end the job, not return an error code some caller forgets to check.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
  MPI_Comm_dup(MPI_COMM_WORLD, &pg->world_);
  MPI_Comm_set_errhandler(pg->world_, MPI_ERRORS_ARE_FATAL);

  RankInfo& in = pg->info_;
  MPI_Comm_rank(pg->world_, &in.rank);
  MPI_Comm_size(pg->world_, &in.world_size);

  // Ranks sharing memory are the ranks of one node; ordered by world rank (key = rank).
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm_split_type(pg->world_, MPI_COMM_TYPE_SHARED, in.rank, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &in.local_rank);
  MPI_Comm_size(node, &in.local_size);
  // Node index: rank of this node's leader among all leaders (leaders ordered by world rank).
  MPI_Comm leaders = MPI_COMM_NULL;
  MPI_Comm_split(pg->world_, in.local_rank == 0 ? 0 : MPI_UNDEFINED, in.rank, &leaders);
  int node_info[2] = {0, 1};
  if (leaders != MPI_COMM_NULL) {
    MPI_Comm_rank(leaders, &node_info[0]);
    MPI_Comm_size(leaders, &node_info[1]);
    MPI_Comm_free(&leaders);
  }
  MPI_Bcast(node_info, 2, MPI_INT, 0, node);
  in.node_index = node_info[0];
  in.num_nodes = node_info[1];
  MPI_Comm_free(&node);

  std::string why = check_local_rank(in.rank, in.local_rank, std::getenv("OMPI_COMM_WORLD_LOCAL_RANK"),
                                     std::getenv("SLURM_LOCALID"), std::getenv("SLURM_PROCID"));
  // Every rank checks its own view; agree on the outcome so that all ranks throw together
  // rather than some waiting for the others in the next collective.
  int bad = why.empty() ? 0 : 1, any_bad = 0;
  MPI_Allreduce(&bad, &any_bad, 1, MPI_INT, MPI_MAX, pg->world_);
  if (any_bad) {
    if (why.empty()) why = "another rank found an inconsistent local rank";
    const std::string msg = "distributed start-up: rank " + std::to_string(in.rank) + ": " + why;
    MPI_Comm_free(&pg->world_);
    delete pg;
    throw Error(msg);
  }
  detail::init_health_comm();  // answers "are you alive?" while waiting (dist/mpi_watchdog.h)
  g_group = pg;
  return *g_group;
}

void ProcessGroup::finalize() {
  if (!g_group) return;
  bool owns = g_group->owns_mpi_;
  detail::free_health_comm();
  if (detail::mpi_alive() && g_group->world_ != MPI_COMM_NULL) MPI_Comm_free(&g_group->world_);
  delete g_group;
  g_group = nullptr;
  if (owns && detail::mpi_alive()) MPI_Finalize();
}

at::Device ProcessGroup::select_cuda_device() {
  // Through ATen's CUDA hooks and the device-guard registry, so that this file needs no CUDA
  // headers and links in the CPU build (where it reports that there is no GPU).
  const int n = at::detail::getCUDAHooks().deviceCount();
  if (n <= 0)
    throw Error("rank " + std::to_string(info_.rank) + ": no CUDA device visible (CPU build, or "
                "CUDA_VISIBLE_DEVICES is empty)");
  int dev = 0;
  if (n == 1) {
    dev = 0;  // the launcher gave each rank its own GPU through CUDA_VISIBLE_DEVICES
  } else if (info_.local_rank < n) {
    dev = info_.local_rank;
  } else {
    throw Error("rank " + std::to_string(info_.rank) + ": local rank " + std::to_string(info_.local_rank) +
                " but only " + std::to_string(n) + " GPUs are visible on this node; start at most one "
                "rank per GPU");
  }
  at::Device d(at::kCUDA, static_cast<c10::DeviceIndex>(dev));
  c10::impl::getDeviceGuardImpl(at::kCUDA)->setDevice(d);
  return d;
}

std::unique_ptr<Communicator> ProcessGroup::make_communicator(at::Device device, double nccl_timeout_s) {
  if (device.is_cpu()) return make_mpi_communicator(world_);
  if (device.is_cuda()) {
#ifdef FLUXTRAIN_WITH_NCCL
    return make_nccl_communicator(world_, device.has_index() ? device.index() : 0, nccl_timeout_s);
#else
    throw Error("distributed: a CUDA communicator needs a build with NCCL (-DFLUXTRAIN_CUDA=ON and nccl.h)");
#endif
  }
  throw Error("distributed: no communicator for device " + device.str());
}

// ---------------------------------------------------------------------------------------------
namespace {
std::atomic<bool> g_dying{false};
}

void fatal(int rank, const std::string& reason, int exit_code) {
  if (g_dying.exchange(true)) {
    // Another thread is already taking the job down; do not race it to stderr or MPI_Abort.
    for (;;) std::this_thread::yield();
  }
  // Messages may carry bytes from files: printable, one line.
  std::fprintf(stderr, "rank %d: %s\n", rank, limits::printable(reason, 2000).c_str());
  std::fflush(stderr);
  if (detail::mpi_alive()) MPI_Abort(MPI_COMM_WORLD, exit_code);  // kills every rank of the job
  std::_Exit(exit_code);
}

void fatal(const std::string& reason, int exit_code) {
  int rank = -1;
  if (detail::mpi_alive()) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  fatal(rank, reason, exit_code);
}

namespace {
void terminate_handler() {
  std::string what = "terminate called without an active exception";
  if (auto e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      what = "uncaught exception: " + detail::one_line(x);
    } catch (...) {
      what = "uncaught non-standard exception";
    }
  }
  fatal(what, 1);
}
}  // namespace

int run_guarded(const std::function<int()>& body) {
  std::set_terminate(terminate_handler);
  int world = 1;
  if (detail::mpi_alive()) MPI_Comm_size(MPI_COMM_WORLD, &world);
  if (world <= 1) return body();  // single process: main reports the exception as usual
  try {
    return body();
  } catch (const Error& e) {
    fatal(detail::one_line(e), e.exit_code());
  } catch (const std::exception& e) {
    fatal(detail::one_line(e), 1);
  } catch (...) {
    fatal("unknown exception", 1);
  }
}

namespace detail {

bool mpi_alive() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

// One line for stderr: c10::Error carries a backtrace and may span lines.
std::string one_line(const std::exception& e) {
  std::string s;
  if (auto* c = dynamic_cast<const c10::Error*>(&e)) s = c->what_without_backtrace();
  else s = e.what();
  for (char& ch : s)
    if (ch == '\n' || ch == '\r') ch = ' ';
  return s;
}

}  // namespace detail

}  // namespace fluxtrain::dist
