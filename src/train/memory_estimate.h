// Peak GPU memory of a training step, predicted from the configuration alone (no model files):
// `fluxtrain estimate`, `fluxtrain doctor` and --max_gpu_memory use it.
//
// Parts (bytes), each a formula in memory_estimate.cpp with the reason for its constants:
//   weights       frozen transformer on the device, by precision and residency (the provider
//                 stack's own plan: dist/low_memory_weights.h), globals and slots included
//   lora          LoRA masters, gradients and AdamW moments (float32: 16 bytes per parameter)
//   activations   saved for backward, with or without activation checkpointing, attention
//                 workspace and backward temporaries included (calibrated, see the .cpp)
//   encoders      text encoders that are trained (weights, LoRA state, activations); 0 when cached
//   context       CUDA context, cuBLAS/cuDNN workspaces: in the driver's view only
//   slack         caching-allocator reserve above the allocated peak: driver's view only
// allocated() is what torch.cuda.max_memory_allocated reports; driver() what nvidia-smi shows.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "dist/low_memory_options.h"
#include "model/flux_config.h"

namespace fluxtrain {

struct MemoryEstimateInput {
  FluxConfig model = FluxConfig::preset("flux-dev");
  int64_t cond_size = 512, noise_size = 1024;  // pixels (latent tokens: (size / 16)^2)
  int64_t num_conditions = 1;                  // EasyControl condition streams (lora_num)
  bool easycontrol = true;                     // false: standard LoRA on lora_targets
  std::vector<std::string> lora_targets;       // standard mode (--lora_targets); empty: q, k, v, out
  int64_t lora_rank = 128;
  int64_t batch = 1;                           // per micro-batch
  int64_t txt_len = 512;                       // T5 tokens
  bool gradient_checkpointing = false;
  bool checkpoint_attention = false;           // with checkpointing: attention results kept (model/recompute.h)
  int64_t compute_bytes = 2;                   // 2: bf16, 4: float32 (--mixed_precision no)
  dist::LowMemoryOptions low_memory;
  bool train_clip = false;                     // text encoder one (CLIP-L) trained with LoRA
  bool train_t5 = false;                       // text encoder two (T5-XXL) trained with LoRA
  int64_t text_encoder_rank = 64;
  int64_t world_size = 1;                      // ranks sharing the frozen weights (sharded)
  bool shard_weights = false;
  void validate() const;
  int64_t tokens() const;                      // per sample: text + noise + conditions
};

struct MemoryEstimate {
  int64_t weights = 0, lora = 0, activations = 0, encoders = 0, context = 0, slack = 0;
  int64_t host_weights = 0;   // frozen blocks in host memory (streamed)
  int64_t host_rss = 0;       // predicted peak resident host memory of the process
  int streamed_blocks = 0;    // chosen by --max_gpu_memory, or --blocks_to_swap
  int64_t bytes_streamed_per_step = 0;  // host-to-device traffic of one micro-batch (fwd + bwd)
  int64_t allocated() const { return weights + lora + activations + encoders; }
  int64_t driver() const { return allocated() + context + slack; }
  nlohmann::json to_json() const;
};

MemoryEstimate estimate_memory(const MemoryEstimateInput& in);
// Everything but the frozen transformer weights (for --max_gpu_memory's budget).
int64_t estimate_non_weight_bytes(const MemoryEstimateInput& in);

// "12.34 GiB"
std::string format_gib(int64_t bytes);

}  // namespace fluxtrain
