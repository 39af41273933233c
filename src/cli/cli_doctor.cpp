// fluxtrain doctor: the seed guide's GPU check. Reads each GPU's name, free memory, compute
// capability and host-to-device bandwidth, runs the memory estimator (train/memory_estimate.h)
// over the shipped presets, and prints which preset to use, why, and its command line. Exits 2
// with one line when no preset fits. Without a GPU it says so and uses --gpu_memory.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include <boost/program_options.hpp>

#include "cli/cli_common.h"
#include "cli/cli_estimate.h"
#include "cli/commands.h"
#include "core/error.h"
#include "dist/offloaded_weights.h"

#ifdef FLUXTRAIN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace po = boost::program_options;

namespace fluxtrain {
namespace {

struct Gpu {
  int index = 0;
  std::string name;
  int64_t total = 0, free = 0;
  int major = 0, minor = 0;
  double h2d = 0;  // bytes/s
};

std::vector<Gpu> list_gpus(bool measure) {
  std::vector<Gpu> out;
#ifdef FLUXTRAIN_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return out;
  for (int i = 0; i < n; ++i) {
    Gpu g;
    g.index = i;
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    g.name = p.name;
    g.major = p.major;
    g.minor = p.minor;
    size_t f = 0, t = 0;
    if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&f, &t) == cudaSuccess) {
      g.free = static_cast<int64_t>(f);
      g.total = static_cast<int64_t>(t);
    }
    if (measure) g.h2d = dist::measure_host_to_device_bandwidth(c10::Device(c10::kCUDA, static_cast<int8_t>(i)), 256ll << 20, 3);
    out.push_back(g);
  }
#endif
  return out;
}

int64_t host_available() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

struct Verdict {
  PresetTier tier;
  bool fits = false, fits_low_memory = false;
  MemoryEstimate shipped, low_memory;
  std::string low_memory_error;
};

}  // namespace

int cmd_doctor(int argc, char** argv) {
  std::string gpu_memory, configs;
  bool no_bandwidth = false;
  po::options_description desc("doctor options");
  desc.add_options()
      ("gpu_memory", po::value(&gpu_memory), "GPU memory to plan for (e.g. 8GiB): default the smallest free memory "
                                               "of the GPUs found; needed without a GPU")
      ("configs", po::value(&configs), "preset directory (default: configs/ of this checkout or $FLUXTRAIN_CONFIGS)")
      ("no_bandwidth", po::bool_switch(&no_bandwidth), "skip the host-to-device bandwidth measurement");
  po::variables_map vm;
  if (!parse_command_line("doctor", desc, argc, argv, vm)) return 0;
  if (configs.empty()) configs = find_configs_dir();
  if (configs.empty())
    throw Error("--configs: no preset directory found (./configs, next to the binary, $FLUXTRAIN_CONFIGS)");

  const std::vector<Gpu> gpus = list_gpus(!no_bandwidth);
  int64_t available = 0;
  if (gpus.empty()) {
    std::printf("no CUDA GPU found (%s)\n",
#ifdef FLUXTRAIN_WITH_CUDA
                "none visible to this process"
#else
                "this is a CPU build"
#endif
    );
  }
  for (const Gpu& g : gpus) {
    std::printf("GPU %d: %s, compute capability %d.%d, %s free of %s", g.index, g.name.c_str(), g.major, g.minor,
                format_gib(g.free).c_str(), format_gib(g.total).c_str());
    if (g.h2d > 0) std::printf(", host-to-device %.1f GB/s", g.h2d / 1e9);
    std::printf("%s\n", g.major < 8 ? " (no bf16 tensor cores: below Ampere, expect slow bf16)" : "");
    available = available == 0 ? g.free : std::min(available, g.free);
  }
  if (!gpu_memory.empty()) available = dist::parse_byte_size(gpu_memory, "gpu_memory");
  const int64_t host = host_available();
  if (host > 0) std::printf("host memory available: %s\n", format_gib(host).c_str());

  EstimateOptions opts;
  char* none[] = {const_cast<char*>("doctor")};
  std::vector<Verdict> verdicts;
  if (available > 0) std::printf("planning for %s of GPU memory\n", format_gib(available).c_str());
  std::printf("\n%-34s %12s %12s %30s\n", "preset (configs/)", "guide goal", "as shipped",
              "+ fp8, checkpointing, streaming");
  for (const PresetTier& t : preset_tiers()) {
    const std::string file = configs + "/" + t.file;
    if (!std::ifstream(file)) continue;
    Verdict v;
    v.tier = t;
    const MemoryEstimateInput in = opts.resolve(file, 1, none);
    v.shipped = estimate_memory(in);
    v.fits = available > 0 && v.shipped.driver() <= available;
    std::string lm = "-";
    if (available > 0) {
      MemoryEstimateInput low = in;
      low.gradient_checkpointing = true;
      low.low_memory.base_precision = "fp8";
      low.low_memory.blocks_to_swap = 0;
      low.low_memory.max_gpu_memory = std::to_string(available);
      try {
        v.low_memory = estimate_memory(low);
        v.fits_low_memory = v.low_memory.driver() <= available;
        lm = format_gib(v.low_memory.driver()) + " (" + std::to_string(v.low_memory.streamed_blocks) + " swapped)";
      } catch (const Error&) {
        lm = "does not fit";
      }
    }
    std::printf("%-34s %9.0f GiB %12s %30s\n", t.file.c_str(), t.goal_gib, format_gib(v.shipped.driver()).c_str(),
                lm.c_str());
    verdicts.push_back(v);
  }
  if (verdicts.empty()) throw Error("--configs " + configs + ": none of the preset files is there");
  if (available <= 0) {
    std::printf("\nno GPU memory to plan for: give --gpu_memory (e.g. --gpu_memory 8GiB) for a recommendation\n");
    return 0;
  }
  const Verdict* pick = nullptr;
  bool low_memory = false;
  for (const Verdict& v : verdicts)
    if (v.fits) {
      pick = &v;
      break;
    }
  if (!pick)
    for (const Verdict& v : verdicts)
      if (v.fits_low_memory) {
        pick = &v;
        low_memory = true;
        break;
      }
  if (!pick) {
    const Verdict* small = &verdicts.front();
    for (const Verdict& v : verdicts)
      if (v.shipped.driver() < small->shipped.driver()) small = &v;
    const Verdict& smallest = *small;
    throw Error("no preset fits in " + format_gib(available) + " of GPU memory: the smallest, " + smallest.tier.file +
                ", needs " + format_gib(smallest.shipped.driver()) + " as shipped and does not fit with fp8 weights "
                "streamed from host memory either");
  }
  const MemoryEstimate& m = low_memory ? pick->low_memory : pick->shipped;
  std::printf("\nuse %s: the most capable preset that fits (%s estimated%s)\n", pick->tier.file.c_str(),
              format_gib(m.driver()).c_str(),
              low_memory ? ", with fp8 base weights and blocks streamed from host memory" : " as shipped");
  if (host > 0 && m.host_rss > host)
    std::printf("warning: it needs about %s of host memory, %s is available\n", format_gib(m.host_rss).c_str(),
                format_gib(host).c_str());
  std::ostringstream cmd;
  if (!pick->tier.script.empty() && !low_memory) cmd << pick->tier.script;
  else cmd << "fluxtrain train --config " << configs << "/" << pick->tier.file;
  cmd << " --pretrained_model_name_or_path MODEL --train_data DATA.h5 --output_dir runs/NAME";
  if (low_memory)
    cmd << " --gradient_checkpointing --base_precision fp8 --max_gpu_memory " << available / (1ll << 20) << "MiB";
  std::printf("command: %s\n", cmd.str().c_str());
  return 0;
}

}  // namespace fluxtrain
