// bench/gpu_power: the summary of NVML samples the bench prints beside a step time, checked
// against a count-based recomputation; and the sampler's behaviour where NVML or CUDA is absent.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "bench/gpu_power.h"

namespace fluxtrain {
namespace {

// The median as the value with at most half the samples on either side, found by counting.
double median_by_counting(const std::vector<double>& v) {
  for (double m : v) {
    const auto below = std::count_if(v.begin(), v.end(), [&](double x) { return x < m; });
    const auto above = std::count_if(v.begin(), v.end(), [&](double x) { return x > m; });
    if (2 * below <= static_cast<long>(v.size()) && 2 * above <= static_cast<long>(v.size())) return m;
  }
  return -1;
}

TEST(BenchPower, SummaryMatchesCountedMediansAndFractions) {
  // Clocks and power of a power-capped step (session 18's H200 figures), unsorted; 9 samples so
  // that the median is one sample.
  const std::vector<double> mhz = {1605, 1980, 1350, 1650, 1605, 1440, 1965, 1590, 1620};
  const std::vector<double> watts = {691, 128, 695, 690, 692, 689, 300, 694, 691};
  const std::vector<bool> capped = {true, false, true, true, true, true, false, true, true};
  std::vector<PowerSample> s;
  for (size_t i = 0; i < mhz.size(); ++i) s.push_back({mhz[i], watts[i], capped[i], i == 4});
  const auto r = summarise_power(s, 1980, 700);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->samples, 9);
  EXPECT_EQ(r->sm_mhz_median, median_by_counting(mhz));
  EXPECT_EQ(r->power_w_median, median_by_counting(watts));
  EXPECT_EQ(r->sm_mhz_min, 1350);
  EXPECT_EQ(r->sm_mhz_max_supported, 1980);
  EXPECT_EQ(r->power_limit_w, 700);
  EXPECT_DOUBLE_EQ(r->power_capped_fraction, 7.0 / 9.0);
  EXPECT_DOUBLE_EQ(r->slowdown_fraction, 1.0 / 9.0);
}

TEST(BenchPower, NoSamplesNoSummary) { EXPECT_FALSE(summarise_power({}, 1980, 700).has_value()); }

TEST(BenchPower, SamplerIsInertWithoutNvmlOrCuda) {
  // On a CPU build (CI) or a machine without the driver the sampler finds no device: start and
  // stop do nothing and the bench prints no gpu_power object.
  PowerSampler p(0, 1);
  if (p.available()) GTEST_SKIP() << "NVML and a CUDA device are present";
  p.start();
  EXPECT_FALSE(p.stop().has_value());
}

}  // namespace
}  // namespace fluxtrain
