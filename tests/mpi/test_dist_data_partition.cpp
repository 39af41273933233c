// DataPartition: per-epoch permutation, disjoint rank parts whose rank-ordered union is the
// single-rank global batch, independent of the number of ranks; checked both by simulating any
// world size in one process and across the real ranks of this run.
#include <algorithm>
#include <set>

#include "core/error.h"
#include "data/dataset.h"
#include "dist/data_partition.h"
#include "tests/mpi/dist_test_util.h"

namespace fluxtrain::dist::testing {
namespace {

TEST(DistDataPartition, RankPartsConcatenateToTheSingleRankBatch) {
  for (int64_t n : {8, 37, 101}) {
    for (int world : {1, 2, 3, 4}) {
      for (int64_t local : {1, 2, 3}) {
        const int64_t G = world * local;
        if (G > n) continue;
        DataPartition single(n, G, 1, 0, 42);
        std::vector<DataPartition> ranks;
        for (int r = 0; r < world; ++r) ranks.emplace_back(n, G, world, r, 42);
        EXPECT_EQ(single.steps_per_epoch(), n / G);
        for (int64_t epoch : {0, 1, 5}) {
          std::set<int64_t> seen;
          for (int64_t s = 0; s < single.steps_per_epoch(); ++s) {
            std::vector<int64_t> cat;
            for (int r = 0; r < world; ++r) {
              auto part = ranks[r].local_batch_indices(epoch, s);
              EXPECT_EQ(static_cast<int64_t>(part.size()), local);
              cat.insert(cat.end(), part.begin(), part.end());
            }
            EXPECT_EQ(cat, single.global_batch_indices(epoch, s)) << "n=" << n << " world=" << world << " step " << s;
            for (int64_t i : cat) {
              EXPECT_TRUE(i >= 0 && i < n);
              EXPECT_TRUE(seen.insert(i).second) << "sample " << i << " twice in epoch " << epoch;
            }
          }
          EXPECT_EQ(static_cast<int64_t>(seen.size()), single.steps_per_epoch() * G);
          // local_epoch_indices is the concatenation of the rank's batches
          std::vector<int64_t> all;
          for (int64_t s = 0; s < single.steps_per_epoch(); ++s) {
            auto b = ranks[world - 1].local_batch_indices(epoch, s);
            all.insert(all.end(), b.begin(), b.end());
          }
          EXPECT_EQ(all, ranks[world - 1].local_epoch_indices(epoch));
        }
      }
    }
  }
}

TEST(DistDataPartition, EpochOrderIsAPermutationDependingOnSeedAndEpochOnly) {
  DataPartition a(50, 5, 1, 0, 7), b(50, 10, 2, 1, 7), c(50, 5, 1, 0, 8);
  auto o = a.epoch_order(3);
  auto sorted = o;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 50; ++i) EXPECT_EQ(sorted[i], i);
  EXPECT_EQ(o, b.epoch_order(3));         // world size / rank / batch do not matter
  EXPECT_NE(o, a.epoch_order(4));         // epochs differ
  EXPECT_NE(o, c.epoch_order(3));         // seeds differ
  EXPECT_EQ(a.epoch_order(4), DataPartition(50, 5, 1, 0, 7).epoch_order(4));  // reproducible
  DataPartition plain(6, 2, 2, 0, 7, /*shuffle=*/false);
  EXPECT_EQ(plain.epoch_order(9), (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
}

TEST(DistDataPartition, ShuffleIsRoughlyUniform) {
  // Over 5000 epochs, each of 5 samples lands first about 1000 times (binomial sd ~ 28).
  DataPartition p(5, 1, 1, 0, 123);
  std::vector<int> first(5, 0);
  for (int64_t e = 0; e < 5000; ++e) ++first[p.epoch_order(e)[0]];
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(first[i], 1000, 150) << "sample " << i;
}

TEST(DistDataPartition, BadSizesThrow) {
  EXPECT_THROW(DataPartition(10, 3, 2, 0, 1), Error);   // 3 not a multiple of 2 ranks
  EXPECT_THROW(DataPartition(3, 4, 2, 0, 1), Error);    // fewer samples than one batch
  EXPECT_THROW(DataPartition(10, 0, 1, 0, 1), Error);
  DataPartition p(10, 4, 2, 1, 1);
  EXPECT_THROW(p.local_batch_indices(0, 2), Error);    // only 2 steps per epoch
}

TEST(DistDataPartition, RealRanksCoverTheGlobalBatch) {
  Communicator& c = comm();
  const int64_t local = 3, G = local * c.size(), n = 5 * G + 2;
  DataPartition mine(n, G, c.size(), c.rank(), 99);
  DataPartition single(n, G, 1, 0, 99);
  for (int64_t s = 0; s < mine.steps_per_epoch(); ++s) {
    auto part = mine.local_batch_indices(2, s);
    at::Tensor t = at::tensor(part, at::kLong);
    at::Tensor all = c.all_gather(t).reshape({-1});
    std::vector<int64_t> got(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + all.numel());
    EXPECT_EQ(got, single.global_batch_indices(2, s));
  }
}

// The trainer's DataOrder (src/data/dataset.h: per-rank micro-batch, global micro-batch =
// batch x world) has the same contract; checked across the real ranks, over an epoch boundary.
TEST(DistDataPartition, TrainerDataOrderRanksCoverTheSingleRankBatch) {
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
