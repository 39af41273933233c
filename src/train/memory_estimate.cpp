#include "train/memory_estimate.h"

#include <algorithm>
#include <cstdio>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/limits.h"
#include "dist/low_memory_weights.h"
#include "model/block_weights.h"
#include "model/flux_weights.h"
#include "model/lora.h"

namespace fluxtrain {
namespace {

constexpr double kGiB = 1024.0 * 1024 * 1024;

// Activation constants, in hidden-size vectors of the compute dtype per token, fitted to the
// resident bf16 step at FLUX.1-dev size on an H100 (docs/benchmarks.md, `fluxtrain bench`, four
// sizes from 1232 to 5632 tokens; max_memory_allocated minus weights and LoRA state):
//  * without checkpointing every block keeps 13.2 of them per token (inputs, normed and
//    modulated activations, q/k/v, attention output, the 4x MLP hidden before and after GELU,
//    minus what is shared), within 1% over the four sizes;
//  * with checkpointing each block keeps its input (1.0), one block at a time holds its full
//    activations again while it is recomputed (13.2), plus a fixed 0.16 GiB (LoRA compute copies
//    and workspaces), within 7%.
constexpr double kSavedPerBlock = 13.2;
constexpr double kCheckpointedPerBlock = 1.0;
constexpr double kCheckpointFixed = 0.16 * kGiB;
// --checkpoint_attention adds each block's attention output (one vector per token) and its
// float32 log-sum-exp (one float per head and token) to what a checkpointed block keeps. By
// construction from the tensors' sizes, not fitted.
double kept_attention_per_block(const FluxConfig& m, double e) {
  return 1.0 + 4.0 * static_cast<double>(m.num_heads) / (static_cast<double>(m.hidden_size) * e);
}
// Driver view: CUDA context with cuBLAS/cuDNN workspaces, and the caching allocator's reserve
// above its allocated peak (rounding, fragmentation). To be checked on the GPU
// (bench/gpu_memory_tiers.sh prints both views next to the estimate).
constexpr double kContext = 0.5 * kGiB;
constexpr double kSlackFraction = 0.05;
// Host memory of the process besides streamed weights: LibTorch/CUDA libraries, the dataset
// reader, one block being loaded (twice: read and converted).
constexpr double kHostBase = 1.5 * kGiB;

// Text encoders (the guide's trained CLIP-L / T5-XXL rows; provisional until they run in the
// trainer): parameters, layers, width, and activation vectors per token and layer.
constexpr double kClipParams = 123.1e6, kT5Params = 4.762e9;
constexpr int64_t kClipLayers = 12, kClipWidth = 768, kClipTokens = 77;
constexpr int64_t kT5Layers = 24, kT5Width = 4096, kT5Vocab = 32128;
constexpr double kEncoderSavedPerLayer = 12.0;

int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

dist::WeightsSource shapes_source(const FluxConfig& cfg, at::ScalarType dtype) {
  dist::WeightsSource src;
  src.num_blocks = static_cast<int>(cfg.num_blocks());
  for (const auto& [name, shape] : flux_weight_shapes(cfg))
    if (name.rfind("double_blocks.", 0) != 0 && name.rfind("single_blocks.", 0) != 0)
      src.globals.emplace(name, at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kMeta)));
  src.block_shapes = [cfg](int i) { return flux_block_shapes(cfg, i); };
  src.load_block = [](int) -> TensorMap {
    throw Error("memory estimate: weights are not read", ErrorKind::Internal);
  };
  return src;
}

int64_t lora_params(const MemoryEstimateInput& in) {
  // The adapters LoraSet::create makes for these options (every condition at the largest rank).
  LoraConfig lc;
  lc.mode = in.easycontrol ? LoraMode::EasyControl : LoraMode::Standard;
  lc.lora_num = in.easycontrol ? static_cast<int>(std::max<int64_t>(in.num_conditions, 1)) : 1;
  lc.ranks.assign(lc.lora_num, in.lora_rank);
  lc.alphas.assign(lc.lora_num, static_cast<double>(in.lora_rank));
  if (!in.easycontrol) lc.targets = in.lora_targets;
  return lora_parameter_count(in.model, lc);
}

int64_t encoder_bytes(const MemoryEstimateInput& in) {
  double b = 0;
  const double e = static_cast<double>(in.compute_bytes);
  const double wbytes = in.low_memory.fp8() ? 1.0 : e;
  const double r = static_cast<double>(in.text_encoder_rank);
  if (in.train_clip || in.train_t5) {  // CLIP is trained in both of the guide's text-encoder rows
    b += kClipParams * e;
    b += 16.0 * kClipLayers * 4 * 2 * r * kClipWidth;
    b += e * in.batch * kClipTokens * kClipLayers * kClipWidth * kEncoderSavedPerLayer;
  }
  if (in.train_t5) {
    // Streamed like the transformer when streaming is on: three layers on the device.
    const double layers_on_device = in.low_memory.streams() ? 3.0 : kT5Layers;
    b += kT5Params * wbytes * layers_on_device / kT5Layers;
    b += 16.0 * kT5Layers * 4 * 2 * r * kT5Width;
    const double per_layer = e * in.batch * in.txt_len * kT5Width * kEncoderSavedPerLayer;
    b += in.gradient_checkpointing ? per_layer * (1 + 1.0 / kEncoderSavedPerLayer * kT5Layers) : per_layer * kT5Layers;
  }
  return static_cast<int64_t>(b);
}

}  // namespace

void MemoryEstimateInput::validate() const {
  model.validate("memory estimate");
  // Upper bounds first: past them the token and byte counts below overflow int64.
  limits::check_range("--cond_size", cond_size, 16, limits::kMaxImageSize);
  limits::check_range("--noise_size", noise_size, 16, limits::kMaxImageSize);
  limits::check_range("--lora_num", num_conditions, 0, limits::kMaxLoraNum);
  limits::check_range("--ranks", lora_rank, 1, limits::kMaxLoraRank);
  limits::check_range("--train_batch_size", batch, 1, limits::kMaxBatch);
  limits::check_range("--txt_len", txt_len, 1, 4096);
  limits::check_range("--text_encoder_rank", text_encoder_rank, 1, limits::kMaxLoraRank);
  limits::check_range("--world_size", world_size, 1, limits::kMaxRanks);
  check_input(cond_size > 0 && cond_size % 16 == 0, "--cond_size must be a positive multiple of 16");
  check_input(noise_size > 0 && noise_size % 16 == 0, "--noise_size must be a positive multiple of 16");
  check_input(num_conditions >= 0, "--lora_num must be >= 0");
  check_input(lora_rank > 0, "--ranks must be positive");
  check_input(batch > 0, "--train_batch_size must be positive");
  check_input(txt_len > 0, "--txt_len must be positive");
  check_input(compute_bytes == 2 || compute_bytes == 4, "--mixed_precision must be bf16 or no");
  check_input(world_size >= 1, "world size must be >= 1");
  low_memory.validate();
}

int64_t MemoryEstimateInput::tokens() const {
  const int64_t n = noise_size / 16, c = cond_size / 16;
  return txt_len + n * n + (easycontrol ? num_conditions : 0) * c * c;
}

std::string format_gib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(bytes) / kGiB);
  return buf;
}

int64_t estimate_non_weight_bytes(const MemoryEstimateInput& in) {
  const MemoryEstimate e = [&] {
    MemoryEstimateInput x = in;
    x.low_memory.max_gpu_memory.clear();  // weights are what the budget is for
    x.low_memory.blocks_to_swap = 0;
    return estimate_memory(x);
  }();
  return e.allocated() - e.weights + e.context + e.slack;
}

MemoryEstimate estimate_memory(const MemoryEstimateInput& in) {
  in.validate();
  MemoryEstimate m;
  const at::ScalarType dtype = in.compute_bytes == 2 ? at::kBFloat16 : at::kFloat;
  const double e = static_cast<double>(in.compute_bytes);
  const double H = static_cast<double>(in.model.hidden_size);
  const double blocks = static_cast<double>(in.model.num_blocks());
  const double L = static_cast<double>(in.tokens() * in.batch);

  m.lora = 16 * lora_params(in);
  m.activations = static_cast<int64_t>(
      in.gradient_checkpointing
          ? L * H * e *
                    ((kCheckpointedPerBlock + (in.checkpoint_attention ? kept_attention_per_block(in.model, e) : 0.0)) *
                         blocks +
                     kSavedPerBlock) +
                kCheckpointFixed
                                : L * H * e * kSavedPerBlock * blocks);
  m.encoders = encoder_bytes(in);
  m.context = static_cast<int64_t>(kContext);

  // Frozen weights: the provider stack's own plan (the budget needs the rest first).
  const dist::WeightsSource src = shapes_source(in.model, dtype);
  int64_t rest = 0;
  if (!in.low_memory.max_gpu_memory.empty()) rest = estimate_non_weight_bytes(in);
  // Several ranks always shard the frozen blocks (train/setup.h): the plan counts 1/N of each,
  // resident or streamed, and the two gather slots.
  const int shard_ranks = in.shard_weights || in.world_size > 1 ? static_cast<int>(in.world_size) : 0;
  const dist::LowMemoryPlan plan = dist::plan_low_memory_weights(src, in.low_memory, dtype, rest, shard_ranks);
  m.weights = plan.device_weight_bytes;
  int64_t largest_block = 0;  // in the compute dtype
  for (int i = 0; i < src.num_blocks; ++i) {
    int64_t b = 0;
    for (const auto& kv : flux_block_shapes(in.model, i)) b += numel(kv.second) * in.compute_bytes;
    largest_block = std::max(largest_block, b);
  }
  m.streamed_blocks = plan.streamed_blocks;
  m.host_weights = plan.host_weight_bytes;
  // T5's layers are all streamed when the transformer streams (train/setup.h place_t5_low_memory):
  // its layers live in host memory too, in the transformer's base precision.
  if (in.train_t5 && in.low_memory.streams())
    m.host_weights += static_cast<int64_t>((kT5Params - kT5Vocab * kT5Width) * (in.low_memory.fp8() ? 1.0 : e));
  m.bytes_streamed_per_step = 2 * plan.host_weight_bytes;  // forward and backward
  m.slack = static_cast<int64_t>(kSlackFraction * static_cast<double>(m.allocated()));
  m.host_rss = m.host_weights + static_cast<int64_t>(kHostBase) + 2 * largest_block;
  return m;
}

nlohmann::json MemoryEstimate::to_json() const {
  auto g = [](int64_t b) { return static_cast<double>(static_cast<int64_t>(b / kGiB * 1000 + 0.5)) / 1000; };
  return {{"estimate_allocated_gib", g(allocated())},
          {"estimate_driver_gib", g(driver())},
          {"weights_gib", g(weights)},
          {"lora_gib", g(lora)},
          {"activations_gib", g(activations)},
          {"encoders_gib", g(encoders)},
          {"context_gib", g(context)},
          {"slack_gib", g(slack)},
          {"host_weights_gib", g(host_weights)},
          {"host_rss_gib", g(host_rss)},
          {"streamed_blocks", streamed_blocks},
          {"bytes_streamed_per_step", bytes_streamed_per_step}};
}

}  // namespace fluxtrain
