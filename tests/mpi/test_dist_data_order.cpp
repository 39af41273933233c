// The trainer's DataOrder (src/data/dataset.h) across the real ranks of this run: per-rank
// micro-batch, global micro-batch = batch x world; the ranks' parts concatenate, in rank order,
// to the single-rank global batch, over an epoch boundary. (The single-process properties:
// tests/unit/test_data_dataset.cpp.) It is the one data-partition scheme of fluxtrain.
#include "data/dataset.h"
#include "tests/mpi/dist_test_util.h"

namespace fluxtrain::dist::testing {
namespace {

TEST(DistDataOrder, RanksCoverTheSingleRankBatch) {
  Communicator& c = comm();
  const int64_t local = 2, n = 3 * local * c.size() + 1;
  DataOrder mine(n, local, c.rank(), c.size(), 77);
  DataOrder single(n, local * c.size(), 0, 1, 77);
  EXPECT_EQ(mine.micro_batches_per_epoch(), single.micro_batches_per_epoch());
  for (int64_t m = 0; m < 2 * mine.micro_batches_per_epoch() + 1; ++m) {
    at::Tensor t = at::tensor(mine.indices(m), at::kLong);
    at::Tensor all = c.all_gather(t).reshape({-1});
    std::vector<int64_t> got(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + all.numel());
    EXPECT_EQ(got, single.indices(m)) << "micro-batch " << m;
  }
}

}  // namespace
}  // namespace fluxtrain::dist::testing
