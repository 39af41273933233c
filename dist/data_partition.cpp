#include "dist/data_partition.h"

#include <numeric>
#include <string>

#include "core/error.h"

namespace fluxtrain::dist {

namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform in [0, bound) without modulo bias (Lemire's multiply-shift with rejection).
uint64_t uniform_below(uint64_t& state, uint64_t bound) {
  for (;;) {
    const uint64_t x = splitmix64(state);
    const __uint128_t m = static_cast<__uint128_t>(x) * bound;
    const uint64_t low = static_cast<uint64_t>(m);
    if (low >= bound || low >= (-bound) % bound) return static_cast<uint64_t>(m >> 64);
  }
}

}  // namespace

DataPartition::DataPartition(int64_t num_samples, int64_t global_batch, int world_size, int rank, uint64_t seed,
                             bool shuffle)
    : num_samples_(num_samples), global_batch_(global_batch), world_(world_size), rank_(rank), seed_(seed),
      shuffle_(shuffle) {
  check_input(world_size >= 1 && rank >= 0 && rank < world_size, "data partition: bad rank/world size");
  check_input(global_batch >= 1 && global_batch % world_size == 0,
              "global batch size " + std::to_string(global_batch) + " is not a positive multiple of the " +
                  std::to_string(world_size) + " ranks");
  check_input(num_samples >= global_batch, "dataset has " + std::to_string(num_samples) +
                                               " samples, fewer than one global batch of " +
                                               std::to_string(global_batch));
}

const std::vector<int64_t>& DataPartition::order(int64_t epoch) const {
  if (epoch == cached_epoch_) return cached_order_;
  cached_order_.resize(static_cast<size_t>(num_samples_));
  std::iota(cached_order_.begin(), cached_order_.end(), int64_t{0});
  if (shuffle_) {
    // The state depends on (seed, epoch) only; mixing both through splitmix keeps nearby
    // seeds/epochs uncorrelated.
    uint64_t st = seed_;
    st = splitmix64(st) ^ (static_cast<uint64_t>(epoch) * 0xd1b54a32d192ed03ull);
    for (int64_t i = num_samples_ - 1; i > 0; --i) {
      const int64_t j = static_cast<int64_t>(uniform_below(st, static_cast<uint64_t>(i) + 1));
      std::swap(cached_order_[i], cached_order_[j]);
    }
  }
  cached_epoch_ = epoch;
  return cached_order_;
}

std::vector<int64_t> DataPartition::epoch_order(int64_t epoch) const { return order(epoch); }

std::vector<int64_t> DataPartition::global_batch_indices(int64_t epoch, int64_t step) const {
  check_input(step >= 0 && step < steps_per_epoch(),
              "data partition: step " + std::to_string(step) + " outside the epoch's " +
                  std::to_string(steps_per_epoch()) + " steps");
  const auto& o = order(epoch);
  return std::vector<int64_t>(o.begin() + step * global_batch_, o.begin() + (step + 1) * global_batch_);
}

std::vector<int64_t> DataPartition::local_batch_indices(int64_t epoch, int64_t step) const {
  check_input(step >= 0 && step < steps_per_epoch(),
              "data partition: step " + std::to_string(step) + " outside the epoch's " +
                  std::to_string(steps_per_epoch()) + " steps");
  const auto& o = order(epoch);
  const int64_t begin = step * global_batch_ + rank_ * local_batch();
  return std::vector<int64_t>(o.begin() + begin, o.begin() + begin + local_batch());
}

std::vector<int64_t> DataPartition::local_epoch_indices(int64_t epoch) const {
  std::vector<int64_t> out;
  for (int64_t s = 0; s < steps_per_epoch(); ++s) {
    auto b = local_batch_indices(epoch, s);
    out.insert(out.end(), b.begin(), b.end());
  }
  return out;
}

}  // namespace fluxtrain::dist
