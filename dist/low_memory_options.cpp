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

namespace {

// Help texts shared by both option tables (bench/estimate and train).
constexpr const char* kFp8MatmulHelp =
    "with --base_precision fp8: multiply the frozen fp8 linears as scaled fp8 GEMMs (activations quantised per row) "
    "instead of dequantising each block to the compute dtype: on an H200 26% faster than dequantising and 18-21% "
    "faster than bf16 weights, at about 1 point more output error against bf16 (docs/memory.md)";
constexpr const char* kFp8KeepTransposedHelp =
    "with --fp8_matmul: keep the transposed codes of the blocks resident on the device for the input-gradient "
    "GEMMs instead of transposing them every step (faster; costs the fp8 codes' bytes again, about 11 GiB for "
    "FLUX.1-dev; streamed blocks still transpose per use; not with --shard_weights)";

}  // namespace

void add_low_memory_options(boost::program_options::options_description& desc, LowMemoryOptions& o) {
  namespace po = boost::program_options;
  desc.add_options()
      ("base_precision", po::value<std::string>(&o.base_precision)->default_value(o.base_precision),
       "frozen transformer weights: bf16 (the compute dtype) or fp8 (e4m3 with float32 scales, dequantised per block)")
      ("fp8_scaling", po::value<std::string>(&o.fp8_scaling)->default_value(o.fp8_scaling),
       "fp8 scales: channel (one per output channel) or tensor")
      ("fp8_modulation", po::value<bool>(&o.fp8_modulation)->default_value(o.fp8_modulation)->implicit_value(true)
                             ->value_name("BOOL"),
       "also store the adaLN modulation linears in fp8")
      ("fp8_matmul", po::value<bool>(&o.fp8_matmul)->default_value(o.fp8_matmul)->implicit_value(true)
                         ->value_name("BOOL"),
       kFp8MatmulHelp)
      ("fp8_keep_transposed", po::value<bool>(&o.fp8_keep_transposed)->default_value(o.fp8_keep_transposed)
                                  ->implicit_value(true)->value_name("BOOL"),
       kFp8KeepTransposedHelp)
      ("offload_prefetch", po::value<int64_t>(&o.offload_prefetch)->default_value(o.offload_prefetch),
       "streamed blocks copied to the GPU ahead of use (side stream)")
      ("blocks_to_swap", po::value<int64_t>(&o.blocks_to_swap)->default_value(o.blocks_to_swap),
       "transformer blocks kept in (pinned) host memory and streamed to the GPU; -1 = all")
      ("max_gpu_memory", po::value<std::string>(&o.max_gpu_memory)->default_value(o.max_gpu_memory),
       "GPU memory budget (e.g. 8GiB): the number of blocks to swap is chosen from the memory estimate");
}

}  // namespace fluxtrain::dist

namespace fluxtrain {

void declare_options(OptionSet& s, dist::LowMemoryOptions& o) {
  s.group("Low memory (docs/memory.md)", "low_memory")
      .add("base_precision", &o.base_precision,
           "frozen transformer weights: bf16 (the compute dtype) or fp8 (e4m3 with float32 scales, dequantised per "
           "block)",
           rules::one_of({"bf16", "fp8"}))
      .add("fp8_scaling", &o.fp8_scaling, "fp8 scales: channel (one per output channel) or tensor",
           rules::one_of({"channel", "tensor"}))
      .add("fp8_modulation", &o.fp8_modulation, "also store the adaLN modulation linears in fp8")
      .add("fp8_matmul", &o.fp8_matmul, dist::kFp8MatmulHelp)
      .add("fp8_keep_transposed", &o.fp8_keep_transposed, dist::kFp8KeepTransposedHelp)
      .add("offload_prefetch", &o.offload_prefetch, "streamed blocks copied to the GPU ahead of use (side stream)")
      .add("blocks_to_swap", &o.blocks_to_swap,
           "transformer blocks kept in (pinned) host memory and streamed to the GPU; -1 = all")
      .add("max_gpu_memory", &o.max_gpu_memory,
           "GPU memory budget (e.g. 8GiB): the number of blocks to swap is chosen from the memory estimate");
}

}  // namespace fluxtrain
