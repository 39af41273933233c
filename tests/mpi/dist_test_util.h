// Helpers for the multi-rank tests of dist/: the shared communicator, deterministic inputs that
// every rank can regenerate for any other rank (so a single-process reference is computed
// locally), and comparisons with explicit tolerances.
#pragma once
#include <cmath>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include "dist/communicator.h"
#include "dist/process_group.h"

namespace fluxtrain::dist::testing {

// One CPU communicator for all tests of a binary run (collectives need every rank anyway).
inline Communicator& comm() {
  static std::unique_ptr<Communicator> c = [] {
    ProcessGroup& pg = ProcessGroup::init();
    return pg.make_communicator(at::kCPU);
  }();
  return *c;
}

// A NCCL communicator on this rank's GPU, or nullptr when the build has no NCCL or some rank
// sees no GPU (decided together, so that every rank skips or runs the same tests).
inline at::Device& nccl_device() {
  static at::Device d = at::kCPU;
  return d;
}
inline Communicator* nccl_comm() {
  static std::unique_ptr<Communicator> c = []() -> std::unique_ptr<Communicator> {
    ProcessGroup& pg = ProcessGroup::init();
    int ok = 0;
#ifdef FLUXTRAIN_WITH_NCCL
    try {
      ok = at::hasCUDA() ? 1 : 0;
    } catch (...) {
    }
#endif
    at::Tensor t = at::full({1}, -ok, at::kLong);
    comm().all_reduce(t, ReduceOp::Max);  // max(-ok) == -1 iff every rank has a GPU
    if (t.item<int64_t>() != -1) return nullptr;
    nccl_device() = pg.select_cuda_device();
    return pg.make_communicator(nccl_device());
  }();
  return c.get();
}

// Deterministic tensor for (seed, rank): identical on whichever rank computes it.
inline at::Tensor rand_for(uint64_t seed, int rank, at::IntArrayRef shape, at::ScalarType dt) {
  auto gen = at::detail::createCPUGenerator(seed * 1000003ull + static_cast<uint64_t>(rank) * 7919ull + 17);
  if (dt == at::kLong) return at::randint(-1000, 1000, shape, gen, at::TensorOptions().dtype(at::kLong));
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kDouble)).to(dt);
}

// |a - b| <= atol + rtol * |b| elementwise, in float64; reports the worst element. Both sides
// are brought to the CPU first: a result on the GPU (NCCL backend) is compared with a reference
// computed on the CPU, and elementwise ops must not mix devices.
inline ::testing::AssertionResult close(const at::Tensor& a, const at::Tensor& b, double rtol, double atol) {
  if (a.sizes() != b.sizes()) return ::testing::AssertionFailure() << "shape " << a.sizes() << " vs " << b.sizes();
  if (a.numel() == 0) return ::testing::AssertionSuccess();
  at::Tensor x = a.detach().to(at::kCPU, at::kDouble), y = b.detach().to(at::kCPU, at::kDouble);
  at::Tensor excess = (x - y).abs() - (atol + rtol * y.abs());
  double worst = excess.max().item<double>();
  if (worst <= 0) return ::testing::AssertionSuccess();
  int64_t i = excess.reshape({-1}).argmax().item<int64_t>();
  return ::testing::AssertionFailure() << "element " << i << ": " << x.reshape({-1})[i].item<double>() << " vs "
                                       << y.reshape({-1})[i].item<double>() << " (rtol " << rtol << ", atol " << atol
                                       << ")";
}

// Bitwise equality (dtype, shape, bytes), on the CPU (either side may be on the GPU).
inline ::testing::AssertionResult bit_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type()) return ::testing::AssertionFailure() << "dtype differs";
  if (a.sizes() != b.sizes()) return ::testing::AssertionFailure() << "shape " << a.sizes() << " vs " << b.sizes();
  at::Tensor x = a.detach().cpu().contiguous().reshape({-1}).view(at::kByte);
  at::Tensor y = b.detach().cpu().contiguous().reshape({-1}).view(at::kByte);
  if (a.numel() == 0 || at::equal(x, y)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "bytes differ";
}

// True on every rank iff `ok` on every rank: lets all ranks agree before asserting, so that a
// failure on one rank does not leave the others waiting in the next collective.
inline bool all_ranks(bool ok) {
  at::Tensor t = at::full({1}, ok ? 1 : 0, at::kLong);
  at::Tensor neg = -t;
  comm().all_reduce(neg, ReduceOp::Max);  // max(-ok) == 0 iff some rank has ok == 0
  return neg.item<int64_t>() == -1;
}

}  // namespace fluxtrain::dist::testing
