// Options of the low-memory engine (docs/memory.md): fp8 base weights and block streaming.
// One struct with its defaults, validate(), and the Boost.Program_options declarations
// (add_low_memory_options), so that `fluxtrain train`, `bench` and `estimate` share them.
#pragma once
#include <cstdint>
#include <string>

namespace boost::program_options {
class options_description;
}

namespace fluxtrain::dist {

struct LowMemoryOptions {
  std::string base_precision = "bf16";  // bf16 (frozen weights in the compute dtype) | fp8 (e4m3 + scales)
  std::string fp8_scaling = "channel";  // channel (per output channel) | tensor
  bool fp8_modulation = false;          // also quantise the adaLN modulation linears
  bool fp8_matmul = false;              // multiply the fp8 linears as scaled fp8 GEMMs (no dequantisation)
  bool fp8_keep_transposed = false;     // with fp8_matmul: keep resident weights' transposed codes
  int64_t offload_prefetch = 1;         // streamed blocks copied ahead of use (ring: prefetch + 1 slots)
  int64_t blocks_to_swap = 0;           // blocks kept in host memory and streamed; -1 = all
  std::string max_gpu_memory;           // "" | "8GiB" | "7.5GB" | "6000MiB": choose blocks_to_swap to fit

  // Throws fluxtrain::Error naming the flag (exit 2) on a bad value.
  void validate() const;
  bool fp8() const { return base_precision == "fp8"; }
  bool streams() const { return blocks_to_swap != 0 || !max_gpu_memory.empty(); }
  int64_t max_gpu_memory_bytes() const;  // 0 when unset
};

// "8GiB", "8 GiB", "7.5GB", "6000MiB", "123456" (bytes) -> bytes; throws Error naming `flag`.
int64_t parse_byte_size(const std::string& text, const std::string& flag);

// Declares --base_precision, --fp8_scaling, --fp8_modulation, --fp8_matmul, --fp8_keep_transposed,
// --offload_prefetch,
// --blocks_to_swap, --max_gpu_memory bound to `o` (defaults from `o`).
void add_low_memory_options(boost::program_options::options_description& desc, LowMemoryOptions& o);

}  // namespace fluxtrain::dist

namespace fluxtrain {
class OptionSet;
// The same options in a subcommand's option table (`train`): the "Low memory" group.
void declare_options(OptionSet& s, dist::LowMemoryOptions& o);
}  // namespace fluxtrain
