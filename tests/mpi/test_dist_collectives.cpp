// Every collective of the MPI communicator on random tensors of odd sizes, against a
// single-process computation of the same result (every rank regenerates all ranks' inputs).
// Only EXPECT_* here: an early return on one rank would leave the others in a collective.
#include <chrono>
#include <thread>

#include "core/error.h"
#include "tests/mpi/dist_test_util.h"

namespace fluxtrain::dist::testing {
namespace {

const std::vector<int64_t> kOddSizes{1, 3, 7, 61, 1001, 12347};

// Tolerances for a sum of `n` standard normal values computed in a different order than the
// float64 reference: float64 and float32 within a few ulps of the magnitude; bfloat16 is reduced
// in float32 and rounded once, so within one bf16 ulp (2^-8 relative) of the rounded reference.
struct Tol { double rtol, atol; };
Tol sum_tol(at::ScalarType dt, int n) {
  switch (dt) {
    case at::kDouble: return {1e-13, 1e-13 * n};
    case at::kFloat: return {1e-6, 1e-6 * n};
    case at::kBFloat16: return {1.0 / 128, 1e-6 * n};
    default: return {0, 0};
  }
}

at::Tensor reference_reduce(uint64_t seed, int world, at::IntArrayRef shape, at::ScalarType dt, ReduceOp op) {
  at::Tensor acc;
  for (int r = 0; r < world; ++r) {
    at::Tensor x = rand_for(seed, r, shape, dt).to(dt == at::kLong ? at::kLong : at::kDouble);
    if (!acc.defined()) acc = x.clone();
    else if (op == ReduceOp::Max) acc = at::maximum(acc, x);
    else acc = acc + x;
  }
  if (op == ReduceOp::Avg) acc = acc / world;
  if (dt == at::kBFloat16) return acc.to(at::kFloat).to(at::kBFloat16);
  return acc.to(dt);
}

// All ranks hold bitwise the same tensor (replicated state must not drift apart).
bool identical_on_all_ranks(const at::Tensor& t_any) {
  at::Tensor t = t_any.cpu().contiguous();
  at::Tensor all = comm().all_gather(t);
  bool ok = true;
  for (int r = 0; r < comm().size(); ++r) ok = ok && bit_equal(all[r], t);
  return ok;
}

// The same tests on both backends: "mpi" (CPU tensors) and "nccl" (CUDA tensors; skipped on
// every rank unless the build has NCCL and every rank has a GPU). References are computed on
// the CPU; results are brought to the CPU (.cpu()) before they are compared.
class DistCollectives : public ::testing::TestWithParam<std::string> {
 protected:
  Communicator* c_ = nullptr;
  at::Device dev_ = at::kCPU;
  void SetUp() override {
    if (GetParam() == "mpi") {
      c_ = &comm();
    } else {
      c_ = nccl_comm();
      if (!c_) GTEST_SKIP() << "no NCCL in this build or no GPU on some rank";
      dev_ = nccl_device();
    }
  }
  at::Tensor on(const at::Tensor& t) const { return t.to(dev_); }
};

TEST_P(DistCollectives, AllReduceMatchesSingleProcess) {
  Communicator& c = *c_;
  uint64_t seed = 100;
  for (at::ScalarType dt : {at::kFloat, at::kDouble, at::kBFloat16, at::kLong}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max}) {
      if (op == ReduceOp::Avg && dt == at::kLong) continue;
      for (int64_t n : kOddSizes) {
        ++seed;
        at::Tensor t = on(rand_for(seed, c.rank(), {n}, dt));
        c.all_reduce(t, op);
        at::Tensor ref = reference_reduce(seed, c.size(), {n}, dt, op);
        Tol tol = op == ReduceOp::Max ? Tol{0, 0} : sum_tol(dt, c.size());
        EXPECT_TRUE(close(t.cpu(), ref, tol.rtol, tol.atol))
            << c10::toString(dt) << " " << reduce_op_name(op) << " n=" << n;
        EXPECT_EQ(t.scalar_type(), dt);
        EXPECT_TRUE(identical_on_all_ranks(t)) << c10::toString(dt) << " " << reduce_op_name(op) << " n=" << n;
      }
    }
  }
}

TEST_P(DistCollectives, AllReduceAsyncAndMultiDim) {
  Communicator& c = *c_;
  at::Tensor a = on(rand_for(7, c.rank(), {3, 5, 7}, at::kFloat));
  at::Tensor b = on(rand_for(8, c.rank(), {11, 13}, at::kDouble));
  auto wa = c.all_reduce_async(a, ReduceOp::Avg);
  auto wb = c.all_reduce_async(b, ReduceOp::Sum);
  wb->wait();
  wa->wait();
  wa->wait();  // idempotent
  EXPECT_TRUE(close(a.cpu(), reference_reduce(7, c.size(), {3, 5, 7}, at::kFloat, ReduceOp::Avg), 1e-6, 1e-6));
  EXPECT_TRUE(close(b.cpu(), reference_reduce(8, c.size(), {11, 13}, at::kDouble, ReduceOp::Sum), 1e-13, 1e-12));
}

TEST_P(DistCollectives, AllGatherIsRankOrderedConcatenation) {
  Communicator& c = *c_;
  uint64_t seed = 300;
  for (at::ScalarType dt : {at::kFloat, at::kDouble, at::kBFloat16, at::kLong}) {
    for (int64_t n : kOddSizes) {
      ++seed;
      at::Tensor in = on(rand_for(seed, c.rank(), {n}, dt));
      std::vector<at::Tensor> parts;
      for (int r = 0; r < c.size(); ++r) parts.push_back(rand_for(seed, r, {n}, dt));
      at::Tensor ref = at::cat(parts);
      at::Tensor out = at::full({c.size() * n}, 42, at::TensorOptions().dtype(dt).device(dev_));
      c.all_gather(out, in);
      EXPECT_TRUE(bit_equal(out.cpu(), ref)) << c10::toString(dt) << " n=" << n;
      // async variant into a [size, n] output, and the convenience overload
      at::Tensor out2 = at::empty({c.size(), n}, at::TensorOptions().dtype(dt).device(dev_));
      c.all_gather_async(out2, in)->wait();
      EXPECT_TRUE(bit_equal(out2.reshape({-1}).cpu(), ref));
      EXPECT_TRUE(bit_equal(c.all_gather(in).reshape({-1}).cpu(), ref));
    }
  }
}

TEST_P(DistCollectives, AllGatherInPlace) {
  // `in` is this rank's part of `out` (how the sharded weights gather): the other parts arrive,
  // this rank's part is left as it is.
  Communicator& c = *c_;
  uint64_t seed = 400;
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    for (int64_t n : kOddSizes) {
      ++seed;
      std::vector<at::Tensor> parts;
      for (int r = 0; r < c.size(); ++r) parts.push_back(rand_for(seed, r, {n}, dt));
      at::Tensor out = at::full({c.size() * n}, 42, at::TensorOptions().dtype(dt).device(dev_));
      at::Tensor mine = out.narrow(0, c.rank() * n, n);
      mine.copy_(on(parts[c.rank()]));
      c.all_gather_async(out, mine)->wait();
      EXPECT_TRUE(bit_equal(out.cpu(), at::cat(parts))) << c10::toString(dt) << " n=" << n;
    }
  }
}

TEST_P(DistCollectives, ReduceScatterKeepsOwnSlice) {
  Communicator& c = *c_;
  uint64_t seed = 500;
  for (at::ScalarType dt : {at::kFloat, at::kDouble, at::kBFloat16, at::kLong}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max}) {
      if (op == ReduceOp::Avg && dt == at::kLong) continue;
      for (int64_t n : kOddSizes) {
        ++seed;
        at::Tensor in = on(rand_for(seed, c.rank(), {c.size() * n}, dt));
        at::Tensor out = at::empty({n}, at::TensorOptions().dtype(dt).device(dev_));
        c.reduce_scatter(out, in, op);
        at::Tensor ref = reference_reduce(seed, c.size(), {c.size() * n}, dt, op).narrow(0, c.rank() * n, n);
        Tol tol = op == ReduceOp::Max ? Tol{0, 0} : sum_tol(dt, c.size());
        EXPECT_TRUE(close(out.cpu(), ref, tol.rtol, tol.atol)) << c10::toString(dt) << " " << reduce_op_name(op) << " n=" << n;
      }
    }
  }
}

TEST_P(DistCollectives, BroadcastFromEveryRoot) {
  Communicator& c = *c_;
  for (int root = 0; root < c.size(); ++root) {
    for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kLong, at::kDouble}) {
      at::Tensor t = on(rand_for(700 + root, c.rank(), {5, 3, 7}, dt));
      c.broadcast(t, root);
      EXPECT_TRUE(bit_equal(t.cpu(), rand_for(700 + root, root, {5, 3, 7}, dt))) << "root " << root;
    }
  }
}

// Part for rank r: shape depends on r (rank 1 gets an empty part) so that sizes differ.
at::Tensor var_part(uint64_t seed, int r, at::ScalarType dt) {
  if (r == 1) return rand_for(seed, r, {0, 3}, dt);
  return rand_for(seed, r, {2 * r + 1, 3}, dt);
}

TEST_P(DistCollectives, VariableSizeScatter) {
  Communicator& c = *c_;
  for (int root : {0, c.size() - 1}) {
    for (at::ScalarType dt : {at::kDouble, at::kBFloat16, at::kLong}) {
      std::vector<at::Tensor> parts;
      if (c.rank() == root)
        for (int r = 0; r < c.size(); ++r) parts.push_back(var_part(900 + root, r, dt));
      at::Tensor got = c.scatter(parts, root);
      EXPECT_EQ(got.device(), dev_);
      EXPECT_TRUE(bit_equal(got.cpu(), var_part(900 + root, c.rank(), dt))) << "root " << root << " " << c10::toString(dt);
    }
  }
  // A scalar (0-dim) part keeps its shape.
  std::vector<at::Tensor> scalars;
  if (c.rank() == 0)
    for (int r = 0; r < c.size(); ++r) scalars.push_back(on(at::scalar_tensor(r * 1.5, at::kDouble)));
  at::Tensor s = c.scatter(scalars, 0).cpu();
  EXPECT_EQ(s.dim(), 0);
  EXPECT_EQ(s.item<double>(), c.rank() * 1.5);
}

TEST_P(DistCollectives, VariableSizeGather) {
  Communicator& c = *c_;
  for (int root : {0, c.size() - 1}) {
    for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
      std::vector<at::Tensor> got = c.gather(on(var_part(1100 + root, c.rank(), dt)), root);
      if (c.rank() == root) {
        EXPECT_EQ(static_cast<int>(got.size()), c.size());
        for (int r = 0; r < std::min<int>(c.size(), got.size()); ++r)
          EXPECT_TRUE(bit_equal(got[r].cpu(), var_part(1100 + root, r, dt))) << "root " << root << " part " << r;
      } else {
        EXPECT_TRUE(got.empty());
      }
    }
  }
}

TEST_P(DistCollectives, BarrierWaitsForTheSlowestRank) {
  Communicator& c = *c_;
  c.barrier();
  auto t0 = std::chrono::steady_clock::now();
  if (c.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  c.barrier();
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(ms, 250.0) << "rank " << c.rank() << " left the barrier before rank 0 entered it";
}

TEST_P(DistCollectives, BadArgumentsThrowBeforeCommunicating) {
  Communicator& c = *c_;
  at::Tensor in = on(at::zeros({5})), out = on(at::zeros({5 * c.size() + 1}));
  EXPECT_THROW(c.all_gather(out, in), Error);
  at::Tensor rs_out = on(at::zeros({4}));
  EXPECT_THROW(c.reduce_scatter(rs_out, on(at::zeros({4 * c.size() + 2})), ReduceOp::Sum), Error);
  at::Tensor ints = on(at::zeros({3}, at::kLong));
  EXPECT_THROW(c.all_reduce(ints, ReduceOp::Avg), Error);
  at::Tensor strided = on(at::zeros({4, 4})).t();
  EXPECT_THROW(c.all_reduce(strided, ReduceOp::Sum), Error);
  EXPECT_THROW(c.broadcast(in, c.size()), Error);
  // Still in step afterwards: a normal collective works.
  at::Tensor one = on(at::ones({1}, at::kDouble));
  c.all_reduce(one, ReduceOp::Sum);
  EXPECT_EQ(one.item<double>(), c.size());
}

INSTANTIATE_TEST_SUITE_P(Backends, DistCollectives, ::testing::Values("mpi", "nccl"),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

TEST(DistProcessGroup, RankLayoutIsConsistent) {
  ProcessGroup& pg = ProcessGroup::init();
  const RankInfo& in = pg.info();
  EXPECT_EQ(in.rank, comm().rank());
  EXPECT_EQ(in.world_size, comm().size());
  // All tests run on one machine: one node, local rank == world rank.
  EXPECT_EQ(in.num_nodes, 1);
  EXPECT_EQ(in.node_index, 0);
  EXPECT_EQ(in.local_size, in.world_size);
  EXPECT_EQ(in.local_rank, in.rank);
  if (const char* v = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) {
    EXPECT_EQ(std::atoi(v), in.local_rank);
  }
}

TEST(DistProcessGroup, LocalRankCrossCheck) {
  EXPECT_EQ(check_local_rank(3, 1, "1", nullptr, nullptr), "");
  EXPECT_NE(check_local_rank(3, 1, "2", nullptr, nullptr), "");
  // srun-started rank: SLURM_PROCID names this rank, so SLURM_LOCALID must agree.
  EXPECT_EQ(check_local_rank(5, 1, nullptr, "1", "5"), "");
  EXPECT_NE(check_local_rank(5, 1, nullptr, "0", "5"), "");
  // mpirun inside an allocation: inherited batch-step variables (PROCID 0) are ignored.
  EXPECT_EQ(check_local_rank(5, 1, "1", "0", "0"), "");
  EXPECT_EQ(check_local_rank(5, 1, nullptr, "0", "0"), "");
}

}  // namespace
}  // namespace fluxtrain::dist::testing
