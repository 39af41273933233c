// MPI backend of Communicator for CPU tensors. Every operation is non-blocking underneath and
// completed by detail::wait_bounded (dist/mpi_watchdog.h): a stopped or lost peer ends the job
// after --mpi_timeout instead of hanging it.
#include <climits>
#include <string>

#include <ATen/ATen.h>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/detail.h"
#include "dist/mpi_watchdog.h"

namespace fluxtrain::dist {

namespace {

// Same-size unsigned type: moves bytes of any dtype (bfloat16 included) without interpreting them.
MPI_Datatype raw_type(const at::Tensor& t) {
  switch (t.element_size()) {
    case 1: return MPI_UINT8_T;
    case 2: return MPI_UINT16_T;
    case 4: return MPI_UINT32_T;
    case 8: return MPI_UINT64_T;
  }
  throw Error("mpi communicator: unsupported element size " + std::to_string(t.element_size()));
}

// MPI type for arithmetic (reductions). bfloat16/float16 are reduced through float32 copies.
MPI_Datatype arith_type(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kLong: return MPI_INT64_T;
    case at::kInt: return MPI_INT32_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kBool: return MPI_UINT8_T;  // stored as 0/1 bytes: max == logical or
    default: break;
  }
  throw Error(std::string("mpi communicator: no reduction for dtype ") + c10::toString(s));
}

bool reduced_via_float(at::ScalarType s) { return s == at::kBFloat16 || s == at::kHalf; }

MPI_Op mpi_op(ReduceOp op, at::ScalarType s) {
  if (op == ReduceOp::Avg && !at::isFloatingType(s))
    throw Error(std::string("mpi communicator: avg needs a floating dtype, got ") + c10::toString(s));
  if (op != ReduceOp::Max && (s == at::kBool || s == at::kByte))
    throw Error(std::string("mpi communicator: only max reduces dtype ") + c10::toString(s));
  return op == ReduceOp::Max ? MPI_MAX : MPI_SUM;
}

int checked_count(int64_t n, const char* what) {
  if (n > INT_MAX)
    throw Error(std::string("mpi communicator: ") + what + ": " + std::to_string(n) +
                " elements exceed MPI's int count; use the NCCL backend or smaller pieces");
  return static_cast<int>(n);
}

void check_cpu(const at::Tensor& t, const char* what) {
  if (!t.defined()) throw Error(std::string("mpi communicator: ") + what + ": undefined tensor");
  if (!t.device().is_cpu())
    throw Error(std::string("mpi communicator: ") + what + ": tensor on " + t.device().str() +
                ", expected CPU");
  if (!t.is_contiguous()) throw Error(std::string("mpi communicator: ") + what + ": tensor not contiguous");
}

class MpiWork : public Work {
 public:
  std::vector<MPI_Request> reqs;
  std::vector<at::Tensor> keep;   // buffers MPI reads or writes until completion
  std::function<void()> finish;   // post-processing after completion (avg, copy-back)
  const char* what = "collective";
  bool done = false;
  void wait() override {
    if (done) return;
    detail::wait_bounded(reqs, what);
    done = true;
    if (finish) finish();
    keep.clear();
  }
  ~MpiWork() override {
    // Leaving a request in flight would let MPI write into freed memory later.
    if (!done) wait();
  }
};

class DoneWork : public Work {
 public:
  void wait() override {}
};

constexpr int kMaxDims = 16;
constexpr int kHeader = 2 + kMaxDims;  // dtype, ndim, dims...

void write_header(const at::Tensor& t, int64_t* h) {
  if (t.dim() > kMaxDims) throw Error("mpi communicator: tensor has more than 16 dimensions");
  h[0] = static_cast<int64_t>(t.scalar_type());
  h[1] = t.dim();
  for (int d = 0; d < kMaxDims; ++d) h[2 + d] = d < t.dim() ? t.size(d) : 0;
}

at::Tensor empty_from_header(const int64_t* h) {
  std::vector<int64_t> shape(h + 2, h + 2 + h[1]);
  return at::empty(shape, at::TensorOptions().dtype(static_cast<at::ScalarType>(h[0])));
}

class MpiCommunicator : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm parent) {
    MPI_Comm_dup(parent, &comm_);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_ARE_FATAL);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    if (detail::mpi_alive()) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  void all_reduce(at::Tensor& t, ReduceOp op) override { all_reduce_async(t, op)->wait(); }

  std::unique_ptr<Work> all_reduce_async(at::Tensor& t, ReduceOp op) override {
    check_cpu(t, "all_reduce");
    auto w = std::make_unique<MpiWork>();
    at::Tensor buf = reduced_via_float(t.scalar_type()) ? t.to(at::kFloat) : t;
    MPI_Datatype type = arith_type(buf.scalar_type());
    MPI_Op mop = mpi_op(op, t.scalar_type());
    w->reqs.resize(1);
    w->what = "all_reduce";
    MPI_Iallreduce(MPI_IN_PLACE, buf.data_ptr(), checked_count(buf.numel(), "all_reduce"), type, mop,
                   comm_, &w->reqs[0]);
    w->keep = {buf, t};
    at::Tensor target = t;
    int n = size_;
    w->finish = [buf, target, op, n]() mutable {
      if (op == ReduceOp::Avg) buf.div_(static_cast<double>(n));
      if (!buf.is_same(target)) target.copy_(buf);
    };
    return w;
  }

  void all_gather(at::Tensor& out, const at::Tensor& in) override { all_gather_async(out, in)->wait(); }

  std::unique_ptr<Work> all_gather_async(at::Tensor& out, const at::Tensor& in) override {
    check_cpu(in, "all_gather input");
    check_cpu(out, "all_gather output");
    check_input(in.scalar_type() == out.scalar_type(), "all_gather: input and output dtypes differ");
    check_input(out.numel() == in.numel() * size_,
                "all_gather: output has " + std::to_string(out.numel()) + " elements, expected " +
                    std::to_string(in.numel() * size_));
    auto w = std::make_unique<MpiWork>();
    w->reqs.resize(1);
    w->what = "all_gather";
    int n = checked_count(in.numel(), "all_gather");
    // In place when `in` already is this rank's part of `out` (MPI forbids aliased buffers).
    MPI_Iallgather(gathers_in_place(out, in) ? MPI_IN_PLACE : in.data_ptr(), n, raw_type(in), out.data_ptr(), n, raw_type(out), comm_,
                   &w->reqs[0]);
    w->keep = {in, out};
    return w;
  }

  void reduce_scatter(at::Tensor& out, const at::Tensor& in, ReduceOp op) override {
    check_cpu(in, "reduce_scatter input");
    check_cpu(out, "reduce_scatter output");
    check_input(in.scalar_type() == out.scalar_type(), "reduce_scatter: input and output dtypes differ");
    check_input(in.numel() == out.numel() * size_,
                "reduce_scatter: input has " + std::to_string(in.numel()) + " elements, expected " +
                    std::to_string(out.numel() * size_));
    const bool via_float = reduced_via_float(in.scalar_type());
    at::Tensor src = via_float ? in.to(at::kFloat) : in;
    at::Tensor dst = via_float ? at::empty(out.sizes(), out.options().dtype(at::kFloat)) : out;
    MPI_Request req;
    MPI_Ireduce_scatter_block(src.data_ptr(), dst.data_ptr(), checked_count(out.numel(), "reduce_scatter"),
                              arith_type(src.scalar_type()), mpi_op(op, in.scalar_type()), comm_, &req);
    detail::wait_bounded(req, "reduce_scatter");
    if (op == ReduceOp::Avg) dst.div_(static_cast<double>(size_));
    if (via_float) out.copy_(dst);
  }

  void broadcast(at::Tensor& t, int root) override {
    check_cpu(t, "broadcast");
    check_root(root);
    MPI_Request req;
    MPI_Ibcast(t.data_ptr(), checked_count(t.numel(), "broadcast"), raw_type(t), root, comm_, &req);
    detail::wait_bounded(req, "broadcast");
  }

  at::Tensor scatter(const std::vector<at::Tensor>& parts, int root) override {
    check_root(root);
    std::vector<int64_t> headers;
    std::vector<at::Tensor> sends;
    if (rank_ == root) {
      check_input(static_cast<int>(parts.size()) == size_,
                  "scatter: root passed " + std::to_string(parts.size()) + " parts for " +
                      std::to_string(size_) + " ranks");
      headers.resize(static_cast<size_t>(kHeader) * size_);
      for (int r = 0; r < size_; ++r) {
        check_input(parts[r].defined(), "scatter: part " + std::to_string(r) + " is undefined");
        check_input(parts[r].scalar_type() == parts[0].scalar_type(), "scatter: parts differ in dtype");
        sends.push_back(parts[r].to(at::kCPU).contiguous());
        write_header(sends.back(), &headers[static_cast<size_t>(kHeader) * r]);
        checked_count(sends.back().numel(), "scatter");
      }
    }
    int64_t mine[kHeader];
    MPI_Request hreq;
    MPI_Iscatter(headers.data(), kHeader, MPI_INT64_T, mine, kHeader, MPI_INT64_T, root, comm_, &hreq);
    detail::wait_bounded(hreq, "scatter");
    at::Tensor out = empty_from_header(mine);
    if (rank_ == root) {
      std::vector<MPI_Request> reqs;
      for (int r = 0; r < size_; ++r) {
        if (r == root || sends[r].numel() == 0) continue;
        reqs.emplace_back();
        MPI_Isend(sends[r].data_ptr(), static_cast<int>(sends[r].numel()), raw_type(sends[r]), r, kTagScatter,
                  comm_, &reqs.back());
      }
      out.copy_(sends[root]);
      detail::wait_bounded(reqs, "scatter");
    } else if (out.numel() > 0) {
      MPI_Request req;
      MPI_Irecv(out.data_ptr(), static_cast<int>(out.numel()), raw_type(out), root, kTagScatter, comm_, &req);
      detail::wait_bounded(req, "scatter");
    }
    return out;
  }

  std::vector<at::Tensor> gather(const at::Tensor& part, int root) override {
    check_root(root);
    check_input(part.defined(), "gather: undefined part");
    at::Tensor send = part.to(at::kCPU).contiguous();
    checked_count(send.numel(), "gather");
    int64_t mine[kHeader];
    write_header(send, mine);
    std::vector<int64_t> headers(rank_ == root ? static_cast<size_t>(kHeader) * size_ : 0);
    MPI_Request hreq;
    MPI_Igather(mine, kHeader, MPI_INT64_T, headers.data(), kHeader, MPI_INT64_T, root, comm_, &hreq);
    detail::wait_bounded(hreq, "gather");
    std::vector<at::Tensor> out;
    if (rank_ == root) {
      std::vector<MPI_Request> reqs;
      for (int r = 0; r < size_; ++r) {
        out.push_back(empty_from_header(&headers[static_cast<size_t>(kHeader) * r]));
        // Checked on root only, after the header exchange, so that every rank is past the
        // collective before root throws (the others then fail in their next collective via
        // the top-level fatal path rather than deadlock on a half-sent gather).
        check_input(out[r].scalar_type() == send.scalar_type(),
                    "gather: rank " + std::to_string(r) + " sent dtype " + c10::toString(out[r].scalar_type()) +
                        ", root has " + c10::toString(send.scalar_type()));
      }
      for (int r = 0; r < size_; ++r) {
        if (r == root || out[r].numel() == 0) continue;
        reqs.emplace_back();
        MPI_Irecv(out[r].data_ptr(), static_cast<int>(out[r].numel()), raw_type(out[r]), r, kTagGather, comm_,
                  &reqs.back());
      }
      out[root].copy_(send);
      detail::wait_bounded(reqs, "gather");
    } else if (send.numel() > 0) {
      MPI_Request req;
      MPI_Isend(send.data_ptr(), static_cast<int>(send.numel()), raw_type(send), root, kTagGather, comm_, &req);
      detail::wait_bounded(req, "gather");
    }
    return out;
  }

  void barrier() override {
    MPI_Request req;
    MPI_Ibarrier(comm_, &req);
    detail::wait_bounded(req, "barrier");
  }

 private:
  static constexpr int kTagScatter = 101, kTagGather = 102;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;

  void check_root(int root) const {
    check_input(root >= 0 && root < size_,
                "root rank " + std::to_string(root) + " out of range for " + std::to_string(size_) + " ranks");
  }
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm) {
  return std::make_unique<MpiCommunicator>(comm);
}

}  // namespace fluxtrain::dist
