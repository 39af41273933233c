// Deterministic random draws without global state.
//
// Every draw comes from a generator seeded by (seed, purpose, epoch, index), so a sample gets the
// same noise, timestep and augmentation whatever the batch layout, the number of ranks, or
// whether the run was resumed: nothing depends on how many draws happened before.
#pragma once
#include <cstdint>

#include <ATen/core/Generator.h>

namespace fluxtrain {

enum class RngPurpose : uint64_t {
  Noise = 1,
  Timestep = 2,
  Shuffle = 3,
  Validation = 4,
  Augment = 5,
  LoraInit = 6,
  Synthetic = 7,
};

// splitmix64-mixed combination of the four parts (a bijective mix per part, so nearby inputs give
// unrelated seeds).
uint64_t derive_seed(uint64_t seed, RngPurpose purpose, uint64_t epoch, uint64_t index);

// Small counter-based scalar generator (splitmix64) for per-sample scalars; independent of
// LibTorch so its stream is fixed by this file alone.
class ScalarRng {
 public:
  explicit ScalarRng(uint64_t seed) : state_(seed) {}
  uint64_t next_u64();
  double uniform();  // [0, 1), 53 random bits
  double normal();   // N(0, 1), Box-Muller (one value per two uniforms; no cached state)

 private:
  uint64_t state_;
};

// A LibTorch CPU generator (for tensors of noise) seeded with `seed`.
at::Generator cpu_generator(uint64_t seed);

}  // namespace fluxtrain
