// Gradient averaging (bucketed, overlapped through hooks), global-norm clipping and the
// sharded AdamW, against single-process computations: every rank regenerates the other
// ranks' gradients and computes the mean / the optimizer step itself (torch::optim::AdamW is
// the reference optimizer).
#include <torch/optim/adamw.h>

#include "dist/grad_sync.h"
#include "train/optimizer.h"
#include "tests/mpi/dist_test_util.h"

namespace fluxtrain::dist::testing {
namespace {

const std::vector<std::vector<int64_t>> kShapes{{3, 5}, {7}, {1}, {4, 9, 2}, {13, 3}, {2, 2}, {31}};

std::vector<at::Tensor> make_params(uint64_t seed, at::ScalarType dt) {
  std::vector<at::Tensor> p;
  for (size_t i = 0; i < kShapes.size(); ++i) p.push_back(rand_for(seed + i, 0, kShapes[i], dt).requires_grad_(true));
  return p;
}

// Rank r's loss: sum_i <p_i, c_{r,i}> + k_r * |p_i|^2 over the parameters it uses, so that
// grad_i = c_{r,i} + 2 k_r p_i. One parameter is used by no rank, one only by rank 0; both
// come first, so that buckets are built (in reverse) from the well-behaved ones first.
constexpr size_t kUnused = 0, kRank0Only = 1;
bool uses(int rank, size_t i) { return i != kUnused && (i != kRank0Only || rank == 0); }
double k_of(int rank, int pass) { return 0.25 * (rank + 1) + 0.1 * pass; }
at::Tensor c_of(int rank, size_t i, int pass, at::ScalarType dt) {
  return rand_for(500 + 10 * pass + i, rank, kShapes[i], dt);
}

void backward_pass(const std::vector<at::Tensor>& p, int rank, int pass) {
  at::Tensor loss = at::zeros({}, p[0].options().requires_grad(false));
  for (size_t i = 0; i < p.size(); ++i)
    if (uses(rank, i)) loss = loss + (p[i] * c_of(rank, i, pass, p[i].scalar_type())).sum() + k_of(rank, pass) * (p[i] * p[i]).sum();
  loss.backward();
}

// Mean over ranks of the gradient of parameter i accumulated over `passes`.
at::Tensor expected_grad(const std::vector<at::Tensor>& p, size_t i, int world, int passes) {
  at::Tensor acc = at::zeros(kShapes[i], at::kDouble);
  for (int r = 0; r < world; ++r)
    for (int pass = 0; pass < passes; ++pass)
      if (uses(r, i)) acc += c_of(r, i, pass, p[i].scalar_type()).to(at::kDouble) + 2 * k_of(r, pass) * p[i].detach().to(at::kDouble);
  return acc / world;
}

void check_mean(const std::vector<at::Tensor>& p, int passes, const std::string& what) {
  const int N = comm().size();
  for (size_t i = 0; i < p.size(); ++i) {
    if (i == kUnused) {
      EXPECT_FALSE(p[i].grad().defined()) << what << ": a parameter without gradients anywhere got one";
      continue;
    }
    EXPECT_TRUE(p[i].grad().defined()) << what << " param " << i;
    if (!p[i].grad().defined()) continue;
    const double tol = p[i].scalar_type() == at::kDouble ? 1e-13 : 1e-6;
    EXPECT_TRUE(close(p[i].grad(), expected_grad(p, i, N, passes), tol, tol)) << what << " param " << i;
    at::Tensor all = comm().all_gather(p[i].grad().contiguous());
    for (int r = 0; r < N; ++r) EXPECT_TRUE(bit_equal(all[r], p[i].grad())) << what << ": ranks disagree on param " << i;
  }
}

TEST(DistGradSync, BucketedAverageEqualsTheMean) {
  for (bool overlap : {true, false}) {
    for (int64_t bucket_bytes : {int64_t{1} << 30, int64_t{1}}) {  // one bucket / one per parameter
      for (at::ScalarType dt : {at::kDouble, at::kFloat}) {
        auto p = make_params(1, dt);
        GradSync sync(comm(), p, {bucket_bytes, overlap});
        if (bucket_bytes == 1) EXPECT_EQ(sync.num_buckets(), static_cast<int>(p.size()));
        else EXPECT_EQ(sync.num_buckets(), 1);
        backward_pass(p, comm().rank(), 0);
        // With hooks, buckets whose parameters all got gradients were issued during backward,
        // in order: the 5 well-behaved ones everywhere (the rank-0-only one too on rank 0).
        if (overlap && bucket_bytes == 1) {
          EXPECT_EQ(sync.buckets_issued_during_backward(), comm().rank() == 0 ? 6 : 5);
        }
        if (!overlap) {
          EXPECT_EQ(sync.buckets_issued_during_backward(), 0);
        }
        sync.finish();
        check_mean(p, 1, std::string(overlap ? "overlap" : "after") + " bucket " + std::to_string(bucket_bytes) +
                             " " + c10::toString(dt));
      }
    }
  }
}

TEST(DistGradSync, AccumulationAndRepeatedBackward) {
  // Gradient accumulation: the first micro-batch stays local, the second is synchronised:
  // the result is the mean over ranks of the accumulated gradients.
  {
    auto p = make_params(2, at::kDouble);
    GradSync sync(comm(), p, {100, true});
    sync.set_enabled(false);
    backward_pass(p, comm().rank(), 0);
    sync.finish();  // disabled: no-op
    sync.set_enabled(true);
    backward_pass(p, comm().rank(), 1);
    sync.finish();
    check_mean(p, 2, "accumulation");
  }
  // Two synchronised backward passes before finish(): buckets issued during the first pass
  // carry stale copies and must be redone.
  {
    auto p = make_params(3, at::kDouble);
    GradSync sync(comm(), p, {100, true});
    backward_pass(p, comm().rank(), 0);
    backward_pass(p, comm().rank(), 1);
    sync.finish();
    check_mean(p, 2, "repeated backward");
  }
  // Several steps in a row reuse the buckets.
  {
    auto p = make_params(4, at::kDouble);
    GradSync sync(comm(), p, {200, true});
    for (int step = 0; step < 3; ++step) {
      for (auto& t : p)
        if (t.grad().defined()) t.mutable_grad().zero_();
      backward_pass(p, comm().rank(), 0);
      sync.finish();
      check_mean(p, 1, "step " + std::to_string(step));
    }
  }
}

// ---- sharded AdamW ---------------------------------------------------------------------------

at::Tensor step_grad(size_t i, int rank, int step) { return rand_for(2000 + 100 * step + i, rank, kShapes[i], at::kDouble); }

// Local gradients as in the GradSync tests: none anywhere for kUnused (AdamW leaves it
// alone), only on rank 0 for kRank0Only (counts as zero on the other ranks).
void set_local_grads(std::vector<at::Tensor>& p, int rank, int step) {
  for (size_t i = 0; i < p.size(); ++i)
    if (uses(rank, i)) p[i].mutable_grad() = step_grad(i, rank, step);
}

at::Tensor mean_grad(size_t i, int world, int step) {
  at::Tensor g = at::zeros(kShapes[i], at::kDouble);
  for (int r = 0; r < world; ++r)
    if (uses(r, i)) g += step_grad(i, r, step);
  return g / world;
}

// Reference: a single process with the mean gradient, torch's clipping formula and AdamW.
struct Reference {
  std::vector<at::Tensor> p;
  std::unique_ptr<torch::optim::AdamW> opt;
  Reference(const std::vector<at::Tensor>& init, const AdamWConfig& o, double lr) {
    for (const auto& t : init) p.push_back(t.detach().clone().requires_grad_(true));
    opt = std::make_unique<torch::optim::AdamW>(
        p, torch::optim::AdamWOptions(lr).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(o.weight_decay));
  }
  double step(int world, int step, double max_norm) {
    for (size_t i = 0; i < p.size(); ++i)
      if (i != kUnused) p[i].mutable_grad() = mean_grad(i, world, step);  // torch skips kUnused
    const double norm = fluxtrain::clip_grad_norm(p, max_norm);  // the trainer's
    opt->step();
    return norm;
  }
  at::Tensor moment(size_t i, bool second) {
    auto& st = static_cast<torch::optim::AdamWParamState&>(*opt->state().at(p[i].unsafeGetTensorImpl()));
    return second ? st.exp_avg_sq() : st.exp_avg();
  }
};

TEST(DistShardedAdamW, MatchesSingleProcessAdamWAndResumesOnAnyWorldSize) {
  const int N = comm().size();
  AdamWConfig o;
  o.weight_decay = 0.1;
  const double lr = 0.01;
  auto p = make_params(7, at::kDouble);
  Reference ref(p, o, lr);
  auto opt_ptr = make_sharded_adamw(comm(), {{"lora", p}}, o);
  Optimizer& opt = *opt_ptr;
  // Optimizer state is split over ranks: ~2 * total / N values each.
  int64_t total = 0;
  for (auto& t : p) total += t.numel();
  EXPECT_LE(opt.state_bytes(), 2 * 8 * (total / N + 64));

  // Step 1 clips (norm of a mean of N standard-normal vectors is ~ sqrt(total / N) > 0.5).
  const std::vector<double> max_norms{0.5, 0, 100.0, 1.0, 0};
  auto compare_params = [&](const std::string& what) {
    for (size_t i = 0; i < p.size(); ++i) EXPECT_TRUE(close(p[i], ref.p[i], 1e-12, 1e-13)) << what << " param " << i;
  };
  for (int s = 0; s < 3; ++s) {
    set_local_grads(p, comm().rank(), s);
    const double norm = opt.step(lr, max_norms[s]);
    const double ref_norm = ref.step(N, s, max_norms[s]);
    EXPECT_NEAR(norm, ref_norm, 1e-12 * ref_norm) << "step " << s;
    compare_params("step " + std::to_string(s));
  }
  // The full state equals the reference optimizer's.
  TensorMap st = opt.state();
  EXPECT_EQ(opt.steps(), 3);
  EXPECT_EQ(st.size(), 2 * p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    if (i == kUnused) {
      EXPECT_TRUE(bit_equal(p[i], ref.p[i])) << "a parameter without gradients must not move";
      EXPECT_EQ(st.at("exp_avg." + std::to_string(i)).abs().max().item<double>(), 0.0);
      continue;
    }
    EXPECT_TRUE(close(st.at("exp_avg." + std::to_string(i)), ref.moment(i, false), 1e-12, 1e-14)) << i;
    EXPECT_TRUE(close(st.at("exp_avg_sq." + std::to_string(i)), ref.moment(i, true), 1e-12, 1e-14)) << i;
  }

  // Resume from that state on one rank (a communicator over MPI_COMM_SELF), on the same N
  // ranks, and in the trainer's replicated AdamW (same state format), and continue alongside
  // the uninterrupted optimizer: all of them stay together.
  auto self_comm = make_mpi_communicator(MPI_COMM_SELF);
  std::vector<at::Tensor> p1, pn, pt;
  for (auto& t : p) {
    p1.push_back(t.detach().clone().requires_grad_(true));
    pn.push_back(t.detach().clone().requires_grad_(true));
    pt.push_back(t.detach().clone().requires_grad_(true));
  }
  auto one = make_sharded_adamw(*self_comm, {{"lora", p1}}, o), again = make_sharded_adamw(comm(), {{"lora", pn}}, o);
  one->load_state(st, opt.steps(), "state");
  again->load_state(st, opt.steps(), "state");
  auto trainer_opt = make_adamw({{"lora", pt}}, o);
  trainer_opt->load_state(st, opt.steps(), "state from the sharded AdamW");
  for (int s = 3; s < 5; ++s) {
    set_local_grads(p, comm().rank(), s);
    set_local_grads(pn, comm().rank(), s);
    // The single-rank runs see the mean gradient directly.
    for (size_t i = 0; i < p1.size(); ++i)
      if (i != kUnused) {
        p1[i].mutable_grad() = mean_grad(i, N, s);
        pt[i].mutable_grad() = mean_grad(i, N, s);
      }
    opt.step(lr, max_norms[s]);
    again->step(lr, max_norms[s]);
    one->step(lr, max_norms[s]);
    trainer_opt->step(lr, max_norms[s]);
    ref.step(N, s, max_norms[s]);
    compare_params("step " + std::to_string(s));
    for (size_t i = 0; i < p.size(); ++i) {
      EXPECT_TRUE(bit_equal(pn[i], p[i])) << "resumed on " << N << " ranks, param " << i;
      EXPECT_TRUE(close(p1[i], p[i], 1e-12, 1e-13)) << "resumed on 1 rank, param " << i;
      EXPECT_TRUE(close(pt[i], p[i], 1e-12, 1e-13)) << "resumed in the trainer's AdamW, param " << i;
    }
  }
}

}  // namespace
}  // namespace fluxtrain::dist::testing

namespace fluxtrain::dist::testing {
namespace {

TEST(DistShardedAdamW, AllParametersActiveMatchesTorch) {
  // Every parameter has a gradient on every rank: the scalar (uniform step count) path.
  const int N = comm().size();
  AdamWConfig o;
  auto p = make_params(8, at::kDouble);
  std::vector<at::Tensor> q;
  for (auto& t : p) q.push_back(t.detach().clone().requires_grad_(true));
  torch::optim::AdamW ref(q, torch::optim::AdamWOptions(0.05).weight_decay(o.weight_decay));
  auto opt = make_sharded_adamw(comm(), {{"lora", p}}, o);
  for (int s = 0; s < 3; ++s) {
    for (size_t i = 0; i < p.size(); ++i) {
      p[i].mutable_grad() = step_grad(i, comm().rank(), s);
      at::Tensor g = at::zeros(kShapes[i], at::kDouble);
      for (int r = 0; r < N; ++r) g += step_grad(i, r, s);
      q[i].mutable_grad() = g / N;
    }
    opt->step(0.05, 0);
    ref.step();
    for (size_t i = 0; i < p.size(); ++i) EXPECT_TRUE(close(p[i], q[i], 1e-12, 1e-13)) << "step " << s << " param " << i;
  }
}

}  // namespace
}  // namespace fluxtrain::dist::testing
