// The GPU's SM clock, power draw and throttle state while the bench times a step. Under a power
// limit (the H200's 700 W) every kernel runs at whatever clock the limit leaves, so a step time
// means little without the clock it ran at: docs/benchmarks.md, session 18, measured the step at
// about 1,600 MHz of 1,980 with the power cap active throughout. NVML is loaded at run time
// (libnvidia-ml.so.1 comes with the driver), so CPU builds and machines without it just report
// nothing.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace fluxtrain {

struct PowerSample {
  double sm_mhz = 0;      // current SM clock
  double power_w = 0;     // board power draw as NVML reports it: an average over about a second on
                          // Hopper, so runs shorter than that read low (the clock and flags are current)
  bool power_capped = false;  // clocks held down by the software power cap (NVML's SwPowerCap reason)
  bool slowdown = false;      // by a hardware or thermal slowdown instead
};

struct PowerSummary {
  int samples = 0;
  double sm_mhz_median = 0, sm_mhz_min = 0, sm_mhz_max_supported = 0;
  double power_w_median = 0, power_limit_w = 0;
  double power_capped_fraction = 0, slowdown_fraction = 0;  // of the samples
};

// Medians and fractions over the samples (nullopt when there are none); max_sm_mhz and
// limit_w are the device's, passed through.
std::optional<PowerSummary> summarise_power(const std::vector<PowerSample>& samples, double max_sm_mhz,
                                            double limit_w);

// Polls NVML every period_ms on a background thread between start() and stop(). Constructed for
// a CUDA device ordinal; inert (stop() returns nullopt) when NVML or the device cannot be found.
class PowerSampler {
 public:
  explicit PowerSampler(int cuda_device, int period_ms = 20);
  ~PowerSampler();
  PowerSampler(const PowerSampler&) = delete;
  PowerSampler& operator=(const PowerSampler&) = delete;

  bool available() const { return device_ != nullptr; }
  void start();
  std::optional<PowerSummary> stop();

 private:
  void poll();

  void* device_ = nullptr;  // nvmlDevice_t
  int period_ms_;
  double max_sm_mhz_ = 0, limit_w_ = 0;
  std::atomic<bool> running_{false};
  std::thread thread_;
  std::mutex mu_;
  std::vector<PowerSample> samples_;
};

}  // namespace fluxtrain
