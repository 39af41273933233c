// Bounded waits for the MPI backend: the MPI counterpart of the NCCL watchdog.
//
// Every MPI operation of MpiCommunicator is issued non-blocking and completed by wait(), which
// polls it. A request still pending after the timeout (--mpi_timeout, default 600 s) means a peer
// is stopped (SIGSTOP, a debugger), hung or lost. The waiting rank then asks every other rank
// whether it is alive, over a health communicator that every rank serves while it waits in any
// MPI collective, and ends the job through fatal(), naming the ranks that did not answer within
// a few seconds: "rank 0: MPI all_reduce did not complete within 600 s; rank 1 did not answer
// (stopped, hung or lost); aborting the job".
//
// Threading: the process is MPI_THREAD_SERIALIZED and all of this runs on the calling thread.
#pragma once
#include <string>
#include <vector>

#include <mpi.h>

namespace fluxtrain::dist {

// Seconds after which a pending MPI operation ends the job (process-wide; > 0).
void set_mpi_timeout(double seconds);
double mpi_timeout();

namespace detail {

// Creates the health communicator (a duplicate of MPI_COMM_WORLD); collective over the world,
// called by ProcessGroup::init(). Without it a timeout still ends the job, naming no peer.
void init_health_comm();
void free_health_comm();

// Completes reqs, serving other ranks' health pings meanwhile; on timeout ends the job via fatal().
// `what` names the operation in the message ("all_reduce", "barrier", ...).
void wait_bounded(std::vector<MPI_Request>& reqs, const char* what);
void wait_bounded(MPI_Request& req, const char* what);

}  // namespace detail
}  // namespace fluxtrain::dist
