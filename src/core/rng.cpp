#include "core/rng.h"

#include <cmath>

#include <ATen/CPUGeneratorImpl.h>

namespace fluxtrain {
namespace {
uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

uint64_t derive_seed(uint64_t seed, RngPurpose purpose, uint64_t epoch, uint64_t index) {
  uint64_t h = mix(seed);
  h = mix(h ^ static_cast<uint64_t>(purpose));
  h = mix(h ^ epoch);
  h = mix(h ^ index);
  return h;
}

uint64_t ScalarRng::next_u64() {
  state_ += 0x9e3779b97f4a7c15ull;
  uint64_t z = state_;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double ScalarRng::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

double ScalarRng::normal() {
  // 1 - uniform() is in (0, 1]: log never sees 0.
  const double u1 = 1.0 - uniform();
  const double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

at::Generator cpu_generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

}  // namespace fluxtrain
