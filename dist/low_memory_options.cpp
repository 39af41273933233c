#include "dist/low_memory_options.h"

#include <cctype>
#include <cmath>

#include <boost/program_options.hpp>

#include "core/error.h"
#include "core/options.h"

namespace fluxtrain::dist {

int64_t parse_byte_size(const std::string& text, const std::string& flag) {
  const std::string bad = "--" + flag + " '" + text + "': expected a size such as 8GiB, 7.5GB, 6000MiB or a byte count";
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0) throw Error(bad);
  double v = 0;
  try {
    size_t used = 0;
    v = std::stod(text.substr(0, i), &used);
    if (used != i) throw Error(bad);
  } catch (const std::logic_error&) {
    throw Error(bad);
  }
  size_t j = i;
  while (j < text.size() && text[j] == ' ') ++j;
  std::string unit;
  for (; j < text.size(); ++j) unit.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(text[j]))));
  double mult = 0;
  if (unit.empty() || unit == "b") mult = 1;
  else if (unit == "kib" || unit == "k") mult = 1024.0;
  else if (unit == "mib" || unit == "m") mult = 1024.0 * 1024;
  else if (unit == "gib" || unit == "g") mult = 1024.0 * 1024 * 1024;
  else if (unit == "kb") mult = 1e3;
  else if (unit == "mb") mult = 1e6;
  else if (unit == "gb") mult = 1e9;
  else throw Error(bad);
  const double bytes = v * mult;
  if (!std::isfinite(bytes) || bytes <= 0 || bytes > 9e18) throw Error(bad);
  return static_cast<int64_t>(bytes);
}

int64_t LowMemoryOptions::max_gpu_memory_bytes() const {
  return max_gpu_memory.empty() ? 0 : parse_byte_size(max_gpu_memory, "max_gpu_memory");
}

void LowMemoryOptions::validate() const {
  if (base_precision != "bf16" && base_precision != "fp8")
    throw Error("--base_precision must be bf16 or fp8, got '" + base_precision + "'");
  if (fp8_scaling != "channel" && fp8_scaling != "tensor")
    throw Error("--fp8_scaling must be channel or tensor, got '" + fp8_scaling + "'");
  if (fp8_matmul && !fp8())
    throw Error("--fp8_matmul multiplies the fp8 base weights: it needs --base_precision fp8, got '" +
                base_precision + "'");
  if (fp8_keep_transposed && !fp8_matmul)
    throw Error("--fp8_keep_transposed keeps the transposed codes that fp8 GEMMs use: it needs --fp8_matmul");
  if (offload_prefetch < 0 || offload_prefetch > 8)
    throw Error("--offload_prefetch must be 0..8 (blocks copied ahead), got " + std::to_string(offload_prefetch));
  if (blocks_to_swap < -1)
    throw Error("--blocks_to_swap must be >= 0, or -1 for all blocks, got " + std::to_string(blocks_to_swap));
  if (!max_gpu_memory.empty()) {
    max_gpu_memory_bytes();
    if (blocks_to_swap != 0)
      throw Error("--max_gpu_memory chooses the number of blocks to swap: give it or --blocks_to_swap, not both");
  }
}

namespace help {

// One text per flag, for both option tables (bench/estimate and train): a second copy drifted
// once (--fp8_matmul's train help still called it slower than dequantising after it was faster).
constexpr const char* kBasePrecision =
    "frozen transformer weights: bf16 (the compute dtype) or fp8 (e4m3 with float32 scales, dequantised per block)";
constexpr const char* kFp8Scaling = "fp8 scales: channel (one per output channel) or tensor";
constexpr const char* kFp8Modulation = "also store the adaLN modulation linears in fp8";
constexpr const char* kFp8Matmul =
    "with --base_precision fp8: multiply the frozen fp8 linears as scaled fp8 GEMMs (activations quantised per row) "
    "instead of dequantising each block to the compute dtype: on an H200 the step takes 18% less time than with "
    "bf16 weights and 21-26% less than dequantising, at about 1 point more output error against bf16 "
    "(docs/memory.md)";
constexpr const char* kFp8KeepTransposed =
    "with --fp8_matmul: keep the transposed codes of the blocks resident on the device for the input-gradient "
    "GEMMs instead of transposing them every step (2-4% faster on an H200; costs the fp8 codes' bytes again, "
    "about 8 GiB for FLUX.1-dev; streamed blocks still transpose per use; not with --shard_weights)";
constexpr const char* kOffloadPrefetch = "streamed blocks copied to the GPU ahead of use (side stream)";
constexpr const char* kBlocksToSwap = "transformer blocks kept in (pinned) host memory and streamed to the GPU; -1 = all";
constexpr const char* kMaxGpuMemory =
    "GPU memory budget (e.g. 8GiB): the number of blocks to swap is chosen from the memory estimate";

}  // namespace help

void add_low_memory_options(boost::program_options::options_description& desc, LowMemoryOptions& o) {
  namespace po = boost::program_options;
  const auto flag = [](bool* b) { return po::value<bool>(b)->default_value(*b)->implicit_value(true)->value_name("BOOL"); };
  desc.add_options()
      ("base_precision", po::value<std::string>(&o.base_precision)->default_value(o.base_precision), help::kBasePrecision)
      ("fp8_scaling", po::value<std::string>(&o.fp8_scaling)->default_value(o.fp8_scaling), help::kFp8Scaling)
      ("fp8_modulation", flag(&o.fp8_modulation), help::kFp8Modulation)
      ("fp8_matmul", flag(&o.fp8_matmul), help::kFp8Matmul)
      ("fp8_keep_transposed", flag(&o.fp8_keep_transposed), help::kFp8KeepTransposed)
      ("offload_prefetch", po::value<int64_t>(&o.offload_prefetch)->default_value(o.offload_prefetch),
       help::kOffloadPrefetch)
      ("blocks_to_swap", po::value<int64_t>(&o.blocks_to_swap)->default_value(o.blocks_to_swap), help::kBlocksToSwap)
      ("max_gpu_memory", po::value<std::string>(&o.max_gpu_memory)->default_value(o.max_gpu_memory),
       help::kMaxGpuMemory);
}

}  // namespace fluxtrain::dist

namespace fluxtrain {

void declare_options(OptionSet& s, dist::LowMemoryOptions& o) {
  namespace help = dist::help;
  s.group("Low memory (docs/memory.md)", "low_memory")
      .add("base_precision", &o.base_precision, help::kBasePrecision, rules::one_of({"bf16", "fp8"}))
      .add("fp8_scaling", &o.fp8_scaling, help::kFp8Scaling, rules::one_of({"channel", "tensor"}))
      .add("fp8_modulation", &o.fp8_modulation, help::kFp8Modulation)
      .add("fp8_matmul", &o.fp8_matmul, help::kFp8Matmul)
      .add("fp8_keep_transposed", &o.fp8_keep_transposed, help::kFp8KeepTransposed)
      .add("offload_prefetch", &o.offload_prefetch, help::kOffloadPrefetch)
      .add("blocks_to_swap", &o.blocks_to_swap, help::kBlocksToSwap)
      .add("max_gpu_memory", &o.max_gpu_memory, help::kMaxGpuMemory);
}

}  // namespace fluxtrain
