// compose_low_memory_weights: the one place where the low-memory options turn into a stack of
// BlockWeights providers (called from the trainer's/bench's provider set-up):
//
//   options                    provider stack (outermost first)
//   bf16                       resident on the device
//   fp8                        Fp8BlockWeights > resident fp8 blocks on the device
//   bf16 + streaming           OffloadedBlockWeights (blocks_to_swap of them in host memory)
//   fp8 + streaming            Fp8BlockWeights > OffloadedBlockWeights of fp8 blocks
//   sharded (comm given)       ShardedBlockWeights, as before
//   sharded + fp8              Fp8BlockWeights > ShardedBlockWeights of fp8 blocks (fp8 gathered)
//   sharded + streaming        ShardedBlockWeights with streamed blocks: each rank keeps its 1/N
//                              of a streamed block in (pinned) host memory, copied in before the gather
//   sharded + fp8 + streaming  Fp8BlockWeights > the same, fp8 codes and scales streamed
//   any fp8 row + fp8_matmul   the same stack; Fp8BlockWeights hands the stored blocks through
//   + fp8_keep_transposed      unsharded: Fp8BlockWeights registers the resident blocks' codes
//                              with kernels::fp8_keep_transposed (transposes made once, kept)
//
// --max_gpu_memory: the blocks to swap are the fewest (spread evenly) such that globals, the
// fp8 dequantisation slot (with --fp8_matmul: the largest weight, dequantised per call), resident
// blocks (with --fp8_keep_transposed: their codes twice) and the streaming ring fit in the budget minus
// `non_weight_bytes` (activations, LoRA, optimizer, workspace: src/train/memory_estimate.h).
// Sharded over N ranks, every block counts 1/N of its bytes (on the device when resident, in
// host memory when streamed), plus two gather slots for the other ranks' parts of the largest
// resident block ((N-1)/N of it) and, when blocks stream, two buffers of the largest streamed
// block, whole, which it is gathered into.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"
#include "dist/low_memory_options.h"
#include "model/block_weights.h"

namespace fluxtrain::dist {

class Communicator;

using BlockShapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;

struct WeightsSource {
  TensorMap globals;                          // full names, any device/dtype
  int num_blocks = 0;
  std::function<TensorMap(int)> load_block;   // block i, relative names, any device/dtype
  // Names and shapes of block i without reading it (flux_block_shapes in
  // train/memory_estimate.h). Optional: without it the plan's byte counts stay 0, and
  // --max_gpu_memory reads every block once more to count them.
  std::function<BlockShapes(int)> block_shapes;
};

struct LowMemoryPlan {
  bool fp8 = false;
  bool fp8_matmul = false;             // fp8 blocks multiplied as stored: no dequantisation slot
  int streamed_blocks = 0;             // in host memory
  int shard_ranks = 0;                 // 0: not sharded; N: blocks sharded over N ranks
  int64_t device_weight_bytes = 0;     // globals + resident blocks + slots (this rank)
  int64_t host_weight_bytes = 0;       // streamed blocks in host memory (this rank)
  int64_t stored_block_bytes = 0;      // all blocks in their stored precision
  int64_t kept_transposed_bytes = 0;   // --fp8_keep_transposed: resident blocks' codes again (device)
  std::string describe() const;        // one line for the start-up log
};

// Bytes of the device slots and blocks for `streamed` blocks (no allocation): what the
// provider built with these options will hold. shard_ranks: 0 unsharded, N sharded over N ranks.
LowMemoryPlan plan_low_memory_weights(const WeightsSource& src, const LowMemoryOptions& opt, at::ScalarType dtype,
                                      int64_t non_weight_bytes = 0, int shard_ranks = 0);

struct OffloadStats;
// The streaming layer's counters in a stack built by compose_low_memory_weights (nullptr when
// nothing streams): bytes_copied before and after a step give the bytes streamed per step.
const OffloadStats* find_offload_stats(BlockWeights& stack);

std::unique_ptr<BlockWeights> compose_low_memory_weights(const WeightsSource& src, const LowMemoryOptions& opt,
                                                         c10::Device device, at::ScalarType dtype,
                                                         Communicator* comm = nullptr, int64_t non_weight_bytes = 0,
                                                         LowMemoryPlan* plan = nullptr);

}  // namespace fluxtrain::dist
