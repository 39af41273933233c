#include "bench/gpu_power.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <type_traits>

#ifdef FLUXTRAIN_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include "core/median.h"

namespace fluxtrain {
namespace {

// The few NVML entry points used, with the types and constants of NVML's C API (nvml.h is not
// needed: the library is opened at run time). Every call returns 0 (NVML_SUCCESS) on success.
using NvmlDevice = void*;
constexpr unsigned kNvmlClockSm = 1;                       // NVML_CLOCK_SM
constexpr unsigned long long kReasonSwPowerCap = 0x4ull;   // nvmlClocksEventReasonSwPowerCap
constexpr unsigned long long kReasonSlowdowns = 0x8ull | 0x20ull | 0x40ull | 0x80ull;  // HW, SW thermal, HW thermal, power brake

struct Nvml {
  int (*init)() = nullptr;
  int (*by_pci_bus_id)(const char*, NvmlDevice*) = nullptr;
  int (*clock)(NvmlDevice, unsigned, unsigned*) = nullptr;
  int (*max_clock)(NvmlDevice, unsigned, unsigned*) = nullptr;
  int (*power)(NvmlDevice, unsigned*) = nullptr;        // milliwatts
  int (*power_limit)(NvmlDevice, unsigned*) = nullptr;  // milliwatts
  int (*reasons)(NvmlDevice, unsigned long long*) = nullptr;
  bool ok = false;
};

// Opened once per process and never closed: NVML stays initialised for later samplers.
const Nvml& nvml() {
  static const Nvml n = [] {
    Nvml r;
    void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return r;
    auto sym = [&](auto& fn, const char* name) { fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name)); };
    sym(r.init, "nvmlInit_v2");
    sym(r.by_pci_bus_id, "nvmlDeviceGetHandleByPciBusId_v2");
    sym(r.clock, "nvmlDeviceGetClockInfo");
    sym(r.max_clock, "nvmlDeviceGetMaxClockInfo");
    sym(r.power, "nvmlDeviceGetPowerUsage");
    sym(r.power_limit, "nvmlDeviceGetEnforcedPowerLimit");
    sym(r.reasons, "nvmlDeviceGetCurrentClocksEventReasons");
    if (!r.reasons) sym(r.reasons, "nvmlDeviceGetCurrentClocksThrottleReasons");  // drivers before 535
    r.ok = r.init && r.by_pci_bus_id && r.clock && r.max_clock && r.power && r.power_limit && r.reasons && r.init() == 0;
    return r;
  }();
  return n;
}

}  // namespace

std::optional<PowerSummary> summarise_power(const std::vector<PowerSample>& samples, double max_sm_mhz,
                                            double limit_w) {
  if (samples.empty()) return std::nullopt;
  std::vector<double> mhz, watts;
  double capped = 0, slow = 0;
  for (const auto& s : samples) {
    mhz.push_back(s.sm_mhz);
    watts.push_back(s.power_w);
    capped += s.power_capped;
    slow += s.slowdown;
  }
  PowerSummary r;
  r.samples = static_cast<int>(samples.size());
  r.sm_mhz_median = median(mhz);
  r.sm_mhz_min = *std::min_element(mhz.begin(), mhz.end());
  r.sm_mhz_max_supported = max_sm_mhz;
  r.power_w_median = median(watts);
  r.power_limit_w = limit_w;
  r.power_capped_fraction = capped / samples.size();
  r.slowdown_fraction = slow / samples.size();
  return r;
}

PowerSampler::PowerSampler(int cuda_device, int period_ms) : period_ms_(period_ms) {
#ifdef FLUXTRAIN_WITH_CUDA
  const Nvml& n = nvml();
  char bus[32] = {0};
  if (!n.ok || cudaDeviceGetPCIBusId(bus, sizeof(bus), cuda_device) != cudaSuccess) return;
  NvmlDevice d = nullptr;
  unsigned mhz = 0, mw = 0;
  if (n.by_pci_bus_id(bus, &d) != 0 || n.max_clock(d, kNvmlClockSm, &mhz) != 0 || n.power_limit(d, &mw) != 0) return;
  device_ = d, max_sm_mhz_ = mhz, limit_w_ = mw / 1000.0;
#else
  (void)cuda_device;
#endif
}

PowerSampler::~PowerSampler() {
  if (running_) stop();
}

void PowerSampler::start() {
  if (!available() || running_) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    samples_.clear();
  }
  running_ = true;
  thread_ = std::thread([this] { poll(); });
}

void PowerSampler::poll() {
  const Nvml& n = nvml();
  while (running_) {
    unsigned mhz = 0, mw = 0;
    unsigned long long why = 0;
    if (n.clock(device_, kNvmlClockSm, &mhz) == 0 && n.power(device_, &mw) == 0 && n.reasons(device_, &why) == 0) {
      std::lock_guard<std::mutex> lock(mu_);
      samples_.push_back({double(mhz), mw / 1000.0, (why & kReasonSwPowerCap) != 0, (why & kReasonSlowdowns) != 0});
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(period_ms_));
  }
}

std::optional<PowerSummary> PowerSampler::stop() {
  if (!running_) return std::nullopt;
  running_ = false;
  thread_.join();
  std::lock_guard<std::mutex> lock(mu_);
  return summarise_power(samples_, max_sm_mhz_, limit_w_);
}

}  // namespace fluxtrain
