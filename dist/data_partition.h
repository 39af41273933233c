// Data parallelism: which samples each rank reads.
//
// Per epoch, a permutation of [0, num_samples) is drawn from (seed, epoch) alone. Global batch s
// of the epoch is positions [s * G, (s + 1) * G) of that order (G = global batch size; a final
// partial batch is dropped). Rank r of N takes the contiguous part [r * G/N, (r + 1) * G/N) of
// each global batch. So the ranks' parts are disjoint, their concatenation in rank order is the
// single-rank global batch, and nothing depends on N: a run with N ranks sees the same batches
// as one with M ranks, and a position (epoch, step) resumes identically on any number of ranks.
//
// The shuffle is self-contained (splitmix64 + Fisher-Yates), not LibTorch's generator, so that
// the order is stable across LibTorch versions and devices.
#pragma once
#include <cstdint>
#include <vector>

namespace fluxtrain::dist {

class DataPartition {
 public:
  // Throws Error when global_batch is not a positive multiple of world_size or exceeds
  // num_samples. shuffle=false: identity order every epoch.
  DataPartition(int64_t num_samples, int64_t global_batch, int world_size, int rank, uint64_t seed,
                bool shuffle = true);

  int64_t num_samples() const { return num_samples_; }
  int64_t global_batch() const { return global_batch_; }
  int64_t local_batch() const { return global_batch_ / world_; }
  int64_t steps_per_epoch() const { return num_samples_ / global_batch_; }

  // The epoch's full order (every rank computes the same).
  std::vector<int64_t> epoch_order(int64_t epoch) const;
  // Sample indices of global batch `step` of `epoch`, for all ranks / for this rank.
  std::vector<int64_t> global_batch_indices(int64_t epoch, int64_t step) const;
  std::vector<int64_t> local_batch_indices(int64_t epoch, int64_t step) const;
  // All of this rank's samples of the epoch, batch after batch.
  std::vector<int64_t> local_epoch_indices(int64_t epoch) const;

 private:
  int64_t num_samples_, global_batch_;
  int world_, rank_;
  uint64_t seed_;
  bool shuffle_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> cached_order_;
  const std::vector<int64_t>& order(int64_t epoch) const;
};

}  // namespace fluxtrain::dist
