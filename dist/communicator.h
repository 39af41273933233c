// Collectives on at::Tensor over all ranks of a process group. Two backends:
//   MPI  (communicator_mpi.cpp):        CPU tensors. Tests and CPU runs.
//   NCCL (communicator_nccl_cuda.cpp):  CUDA tensors on the communicator's own CUDA stream,
//        ordered with events against the caller's current stream; CPU tensors passed to it
//        go through MPI. GPU build only.
//
// Rules for every call:
//  * Every rank calls the same collectives in the same order (the usual MPI/NCCL contract).
//  * Tensors must be contiguous unless stated; dtypes float32, float64, bfloat16, float16,
//    int64, int32, uint8, bool (reductions: floating and integer types; bool and uint8 only max).
//  * Reductions of bfloat16/float16 accumulate in float32 on the MPI backend (NCCL reduces in
//    the dtype itself: pass float32 when precision matters). Avg = Sum / world_size.
//  * A failure in the library (MPI error, NCCL error or timeout) ends the job via fatal();
//    bad arguments (mismatched sizes, dtypes) throw fluxtrain::Error before anything is sent.
//
// Asynchronous variants return a Work. On MPI, wait() blocks until the data has arrived. On
// NCCL, wait() does not block the host: it makes the caller's current CUDA stream wait for the
// collective, so that work queued afterwards sees the result.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <mpi.h>

namespace fluxtrain::dist {

enum class ReduceOp { Sum, Avg, Max };
const char* reduce_op_name(ReduceOp op);

class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;  // idempotent
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;  // "mpi" or "nccl"

  // In place on every rank; results are identical on every rank.
  virtual void all_reduce(at::Tensor& t, ReduceOp op) = 0;
  virtual std::unique_ptr<Work> all_reduce_async(at::Tensor& t, ReduceOp op) = 0;

  // out (numel = size * in.numel(), any shape, contiguous) receives every rank's `in`
  // concatenated in rank order (flat). In place when `in` is this rank's part of `out`
  // (in.data_ptr() == out.data_ptr() + rank * in.nbytes()): only the other parts move.
  virtual void all_gather(at::Tensor& out, const at::Tensor& in) = 0;
  virtual std::unique_ptr<Work> all_gather_async(at::Tensor& out, const at::Tensor& in) = 0;
  // Convenience: returns a new tensor [size, *in.shape].
  at::Tensor all_gather(const at::Tensor& in);
  // True when all_gather(out, in) is the in-place case described above.
  bool gathers_in_place(const at::Tensor& out, const at::Tensor& in) const;

  // in (numel = size * out.numel()) is reduced elementwise over ranks; rank r keeps elements
  // [r * out.numel(), (r+1) * out.numel()) of the result in out.
  virtual void reduce_scatter(at::Tensor& out, const at::Tensor& in, ReduceOp op) = 0;

  // t (same shape and dtype on every rank) takes root's values.
  virtual void broadcast(at::Tensor& t, int root) = 0;

  // Variable-size scatter: on root, parts[r] is what rank r receives (one dtype for all parts,
  // shapes may differ, size() parts); other ranks pass an empty vector. Every rank gets a new
  // tensor with its part's shape, on this communicator's device kind (root's parts may be on
  // the device or the host of the matching kind).
  virtual at::Tensor scatter(const std::vector<at::Tensor>& parts, int root) = 0;
  // Variable-size gather: every rank passes its part (one dtype across ranks, shapes may
  // differ); root gets all parts in rank order, other ranks get an empty vector.
  virtual std::vector<at::Tensor> gather(const at::Tensor& part, int root) = 0;

  // Returns when every rank has entered it (and, on NCCL, when the caller's stream has
  // reached it: it synchronises the current stream).
  virtual void barrier() = 0;
};

// MPI backend over a duplicate of `comm` (the caller keeps ownership of `comm`).
std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm);

// NCCL backend (defined only in builds with FLUXTRAIN_WITH_NCCL): unique id broadcast over
// `comm`, communicator on CUDA device `device_index` (already selected), watchdog aborting
// the job when a collective takes longer than timeout_s.
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, int device_index,
                                                     double timeout_s);

}  // namespace fluxtrain::dist
