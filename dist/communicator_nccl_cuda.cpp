// NCCL backend of Communicator for CUDA tensors (GPU build with NCCL only).
//
// Streams: every collective runs on the communicator's own high-priority stream. Before it,
// that stream waits for an event recorded on the caller's current stream (inputs written,
// output buffers no longer read); after it, a completion event is recorded. Synchronous calls
// make the caller's stream wait for that event; asynchronous ones return it as the Work. The
// host never blocks (except barrier()). Tensors used on the side stream are recorded with the
// caching allocator so that their memory is not reused before the collective is done.
//
// Failures: a NCCL error aborts the job through fatal() at once (a failed call on one rank
// leaves the others waiting). A watchdog thread polls ncclCommGetAsyncError and the completion
// events; a collective still running after the timeout (a peer died or hangs) or an
// asynchronous error aborts the communicator and then the job, with the rank and the
// collective on stderr.
//
// CPU tensors (metadata, flags, small host values) go through an MPI communicator.
#ifdef FLUXTRAIN_WITH_NCCL

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/detail.h"
#include "dist/process_group.h"

namespace fluxtrain::dist {

namespace {

using Clock = std::chrono::steady_clock;

ncclDataType_t nccl_type(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kByte: return ncclUint8;
    case at::kBool: return ncclUint8;  // 0/1 bytes: max == logical or
    case at::kChar: return ncclInt8;
    default: break;
  }
  throw Error(std::string("nccl communicator: unsupported dtype ") + c10::toString(s));
}

ncclRedOp_t nccl_op(ReduceOp op, at::ScalarType s) {
  if (op == ReduceOp::Avg && !at::isFloatingType(s))
    throw Error(std::string("nccl communicator: avg needs a floating dtype, got ") + c10::toString(s));
  if (op != ReduceOp::Max && (s == at::kBool || s == at::kByte))
    throw Error(std::string("nccl communicator: only max reduces dtype ") + c10::toString(s));
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Avg: return ncclAvg;
    case ReduceOp::Max: return ncclMax;
  }
  return ncclSum;
}

class NcclWork : public Work {
 public:
  NcclWork(std::shared_ptr<at::cuda::CUDAEvent> done, c10::DeviceIndex device) : done_(std::move(done)), device_(device) {}
  void wait() override {
    // Orders the caller's current stream after the collective; the host does not block.
    done_->block(c10::cuda::getCurrentCUDAStream(device_));
  }

 private:
  std::shared_ptr<at::cuda::CUDAEvent> done_;
  c10::DeviceIndex device_;
};

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(MPI_Comm parent, int device, double timeout_s)
      : device_(static_cast<c10::DeviceIndex>(device)),
        timeout_(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s))),
        stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device))) {
    MPI_Comm_dup(parent, &mpi_);
    MPI_Comm_set_errhandler(mpi_, MPI_ERRORS_ARE_FATAL);
    MPI_Comm_rank(mpi_, &rank_);
    MPI_Comm_size(mpi_, &size_);
    host_ = make_mpi_communicator(mpi_);
    c10::cuda::CUDAGuard guard(device_);
    ncclUniqueId id;
    if (rank_ == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    MPI_Bcast(&id, static_cast<int>(sizeof id), MPI_BYTE, 0, mpi_);
    check(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
    watchdog_ = std::thread([this] { watch(); });
  }

  ~NcclCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    if (comm_) {
      c10::cuda::CUDAGuard guard(device_);
      cudaStreamSynchronize(stream_.stream());
      ncclCommDestroy(comm_);
    }
    if (detail::mpi_alive()) MPI_Comm_free(&mpi_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  void all_reduce(at::Tensor& t, ReduceOp op) override { all_reduce_async(t, op)->wait(); }

  std::unique_ptr<Work> all_reduce_async(at::Tensor& t, ReduceOp op) override {
    if (on_host(t)) return host_->all_reduce_async(t, op);
    check_dev(t, "all_reduce");
    const ncclDataType_t type = nccl_type(t.scalar_type());
    const ncclRedOp_t rop = nccl_op(op, t.scalar_type());
    return enqueue("all_reduce", {t}, [&](cudaStream_t s) {
      check(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), type, rop, comm_, s), "ncclAllReduce");
    });
  }

  void all_gather(at::Tensor& out, const at::Tensor& in) override { all_gather_async(out, in)->wait(); }

  std::unique_ptr<Work> all_gather_async(at::Tensor& out, const at::Tensor& in) override {
    if (on_host(in) && on_host(out)) return host_->all_gather_async(out, in);
    check_dev(in, "all_gather input");
    check_dev(out, "all_gather output");
    check_input(in.scalar_type() == out.scalar_type(), "all_gather: input and output dtypes differ");
    check_input(out.numel() == in.numel() * size_,
                "all_gather: output has " + std::to_string(out.numel()) + " elements, expected " +
                    std::to_string(in.numel() * size_));
    // A gather only moves bytes: one-byte types NCCL does not name (fp8 codes) travel as uint8.
    const ncclDataType_t type = in.element_size() == 1 ? ncclUint8 : nccl_type(in.scalar_type());
    // NCCL gathers in place when `in` is this rank's part of `out` (the sharded weights' case):
    // then only the other ranks' parts move, and with one rank nothing does.
    const bool in_place = gathers_in_place(out, in);
    return enqueue("all_gather", {in, out}, [&](cudaStream_t s) {
      if (in_place && size_ == 1) return;
      check(ncclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), type, comm_, s), "ncclAllGather");
    });
  }

  void reduce_scatter(at::Tensor& out, const at::Tensor& in, ReduceOp op) override {
    if (on_host(in) && on_host(out)) return host_->reduce_scatter(out, in, op);
    check_dev(in, "reduce_scatter input");
    check_dev(out, "reduce_scatter output");
    check_input(in.scalar_type() == out.scalar_type(), "reduce_scatter: input and output dtypes differ");
    check_input(in.numel() == out.numel() * size_,
                "reduce_scatter: input has " + std::to_string(in.numel()) + " elements, expected " +
                    std::to_string(out.numel() * size_));
    const ncclDataType_t type = nccl_type(in.scalar_type());
    const ncclRedOp_t rop = nccl_op(op, in.scalar_type());
    enqueue("reduce_scatter", {in, out}, [&](cudaStream_t s) {
      check(ncclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), type, rop, comm_, s), "ncclReduceScatter");
    })->wait();
  }

  void broadcast(at::Tensor& t, int root) override {
    if (on_host(t)) return host_->broadcast(t, root);
    check_dev(t, "broadcast");
    check_root(root);
    const ncclDataType_t type = nccl_type(t.scalar_type());
    enqueue("broadcast", {t}, [&](cudaStream_t s) {
      check(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), type, root, comm_, s), "ncclBroadcast");
    })->wait();
  }

  at::Tensor scatter(const std::vector<at::Tensor>& parts, int root) override {
    check_root(root);
    // Shapes and dtype travel over MPI (the same variable-size scatter, on tiny host tensors).
    std::vector<at::Tensor> headers, sends;
    if (rank_ == root) {
      check_input(static_cast<int>(parts.size()) == size_,
                  "scatter: root passed " + std::to_string(parts.size()) + " parts for " + std::to_string(size_) +
                      " ranks");
      for (int r = 0; r < size_; ++r) {
        check_input(parts[r].defined() && parts[r].scalar_type() == parts[0].scalar_type(),
                    "scatter: parts must be defined and share one dtype");
        sends.push_back(parts[r].to(at::Device(at::kCUDA, device_)).contiguous());
        headers.push_back(header_of(sends.back()));
      }
    }
    at::Tensor out = from_header(host_->scatter(headers, root));
    const ncclDataType_t type = nccl_type(out.scalar_type());
    std::vector<at::Tensor> keep = sends;
    keep.push_back(out);
    enqueue("scatter", keep, [&](cudaStream_t s) {
      check(ncclGroupStart(), "ncclGroupStart");
      if (rank_ == root) {
        for (int r = 0; r < size_; ++r)
          if (r != root && sends[r].numel() > 0)
            check(ncclSend(sends[r].data_ptr(), sends[r].numel(), type, r, comm_, s), "ncclSend");
      } else if (out.numel() > 0) {
        check(ncclRecv(out.data_ptr(), out.numel(), type, root, comm_, s), "ncclRecv");
      }
      check(ncclGroupEnd(), "ncclGroupEnd");
    })->wait();
    if (rank_ == root) out.copy_(sends[root]);
    return out;
  }

  std::vector<at::Tensor> gather(const at::Tensor& part, int root) override {
    check_root(root);
    check_input(part.defined(), "gather: undefined part");
    at::Tensor send = part.to(at::Device(at::kCUDA, device_)).contiguous();
    std::vector<at::Tensor> headers = host_->gather(header_of(send), root);
    std::vector<at::Tensor> out;
    for (const at::Tensor& h : headers) {
      out.push_back(from_header(h));
      check_input(out.back().scalar_type() == send.scalar_type(), "gather: ranks sent different dtypes");
    }
    const ncclDataType_t type = nccl_type(send.scalar_type());
    std::vector<at::Tensor> keep = out;
    keep.push_back(send);
    enqueue("gather", keep, [&](cudaStream_t s) {
      check(ncclGroupStart(), "ncclGroupStart");
      if (rank_ == root) {
        for (int r = 0; r < size_; ++r)
          if (r != root && out[r].numel() > 0)
            check(ncclRecv(out[r].data_ptr(), out[r].numel(), type, r, comm_, s), "ncclRecv");
      } else if (send.numel() > 0) {
        check(ncclSend(send.data_ptr(), send.numel(), type, root, comm_, s), "ncclSend");
      }
      check(ncclGroupEnd(), "ncclGroupEnd");
    })->wait();
    if (rank_ == root) out[root].copy_(send);
    return out;
  }

  void barrier() override {
    c10::cuda::CUDAGuard guard(device_);
    c10::cuda::getCurrentCUDAStream(device_).synchronize();
    host_->barrier();
  }

 private:
  c10::DeviceIndex device_;
  Clock::duration timeout_;
  c10::cuda::CUDAStream stream_;
  MPI_Comm mpi_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  std::unique_ptr<Communicator> host_;
  ncclComm_t comm_ = nullptr;

  struct Pending {
    std::shared_ptr<at::cuda::CUDAEvent> done;
    Clock::time_point start;
    const char* what;
  };
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> pending_;
  bool stop_ = false;
  std::thread watchdog_;

  static bool on_host(const at::Tensor& t) { return t.defined() && t.device().is_cpu(); }

  void check_dev(const at::Tensor& t, const char* what) const {
    if (!t.defined()) throw Error(std::string("nccl communicator: ") + what + ": undefined tensor");
    if (!t.is_cuda() || t.device().index() != device_)
      throw Error(std::string("nccl communicator: ") + what + ": tensor on " + t.device().str() + ", expected cuda:" +
                  std::to_string(device_));
    if (!t.is_contiguous()) throw Error(std::string("nccl communicator: ") + what + ": tensor not contiguous");
  }

  void check_root(int root) const {
    check_input(root >= 0 && root < size_,
                "root rank " + std::to_string(root) + " out of range for " + std::to_string(size_) + " ranks");
  }

  // A failed NCCL call on this rank leaves the peers waiting: end the job now.
  void check(ncclResult_t r, const char* call) {
    if (r == ncclSuccess) return;
    std::string msg = std::string("NCCL ") + call + " failed: " + ncclGetErrorString(r);
    if (comm_) {
      const char* last = ncclGetLastError(comm_);
      if (last && *last) msg += std::string(" (") + last + ")";
    }
    fatal(rank_, msg);
  }

  static at::Tensor header_of(const at::Tensor& t) {
    std::vector<int64_t> h{static_cast<int64_t>(t.scalar_type())};
    for (int64_t d : t.sizes()) h.push_back(d);
    return at::tensor(h, at::kLong);
  }

  at::Tensor from_header(const at::Tensor& h) const {
    const int64_t* p = h.data_ptr<int64_t>();
    std::vector<int64_t> shape(p + 1, p + h.numel());
    return at::empty(shape, at::TensorOptions().dtype(static_cast<at::ScalarType>(p[0])).device(at::kCUDA, device_));
  }

  template <typename Launch>
  std::unique_ptr<Work> enqueue(const char* what, const std::vector<at::Tensor>& tensors, Launch&& launch) {
    c10::cuda::CUDAGuard guard(device_);
    const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device_);
    at::cuda::CUDAEvent ready;
    ready.record(caller);
    ready.block(stream_);
    launch(stream_.stream());
    for (const at::Tensor& t : tensors)
      if (t.defined() && t.numel() > 0) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream_);
    auto done = std::make_shared<at::cuda::CUDAEvent>();
    done->record(stream_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_.push_back({done, Clock::now(), what});
    }
    return std::make_unique<NcclWork>(done, device_);
  }

  void watch() {
    cudaSetDevice(device_);
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      cv_.wait_for(lock, std::chrono::milliseconds(200));
      if (stop_) break;
      while (!pending_.empty() && pending_.front().done->query()) pending_.pop_front();
      std::string problem;
      ncclResult_t async = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress)
        problem = std::string("NCCL asynchronous error: ") + ncclGetErrorString(async);
      else if (!pending_.empty() && Clock::now() - pending_.front().start > timeout_)
        problem = std::string("NCCL ") + pending_.front().what + " did not complete within " +
                  std::to_string(std::chrono::duration_cast<std::chrono::seconds>(timeout_).count()) +
                  " s (a peer rank died or hangs)";
      if (!problem.empty()) {
        // Unblock this rank's NCCL kernels, but do not wait for that: the job ends either way.
        ncclComm_t c = comm_;
        std::thread([c] { ncclCommAbort(c); }).detach();
        fatal(rank_, problem + "; aborting the job");
      }
    }
  }
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, int device_index, double timeout_s) {
  return std::make_unique<NcclCommunicator>(comm, device_index, timeout_s);
}

}  // namespace fluxtrain::dist

#endif  // FLUXTRAIN_WITH_NCCL
