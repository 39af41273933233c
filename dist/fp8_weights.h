// fp8 base weights: a BlockWeights layer whose inner provider holds each block's frozen linear
// weights in e4m3 with float32 scales (kernels/fp8.h), and which dequantises a block into a
// compute-dtype slot when it is acquired. LoRA, norms, biases, modulation (unless asked for)
// and the globals (embedders, final layer) stay in the compute dtype.
//
// Composition: the inner provider decides where the stored form lives --
//   ResidentBlockWeights on the device          fp8 resident (half the bytes of bf16)
//   OffloadedBlockWeights (host memory)         fp8 streamed: half the bytes cross PCIe
//   dist::ShardedBlockWeights (dtype unset)     fp8 shards, gathered in fp8, dequantised here
// The inner provider sees the same acquire/release/will_use sequence as this layer, one
// block held at a time, so its prefetching works unchanged.
//
// Stored form of a block (quantise_block_fp8): a quantised weight keeps its name and holds the
// e4m3 codes; "<name>:fp8_scale" holds its scales. Everything else is cast to the compute dtype.
//
// --fp8_matmul (hand_stored): acquire hands the model the inner provider's stored block as it is
// (codes under the weight's name, scales under the suffix key; the model multiplies them as fp8
// GEMMs, kernels/fp8_matmul.h), so no dequantisation slot is allocated.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dist/block_slots.h"
#include "kernels/fp8.h"
#include "model/block_weights.h"

namespace fluxtrain::dist {

using kernels::kFp8ScaleSuffix;

struct Fp8WeightsOptions {
  kernels::Fp8Scaling scaling = kernels::Fp8Scaling::PerChannel;
  bool quantise_modulation = false;  // the adaLN modulation linears (a third of a block's bytes)
};

// True for the weights quantised: 2-D floating "*.weight" linears, modulation only when asked.
bool fp8_quantisable(const std::string& name, const at::Tensor& t, const Fp8WeightsOptions& opt);
bool fp8_quantisable(const std::string& name, int64_t dims, const Fp8WeightsOptions& opt);  // floating assumed
// Bytes of a block's stored form from names and shapes alone (compute_dtype elements elsewhere).
int64_t fp8_stored_bytes(const std::vector<std::pair<std::string, std::vector<int64_t>>>& shapes,
                         const Fp8WeightsOptions& opt, at::ScalarType compute_dtype);
TensorMap quantise_block_fp8(const TensorMap& block, const Fp8WeightsOptions& opt, at::ScalarType compute_dtype);
// The compute form of a stored block: exactly what Fp8BlockWeights hands out.
TensorMap dequantise_block_fp8(const TensorMap& stored, at::ScalarType compute_dtype);
// Names, shapes and dtypes of the compute form of a stored block.
std::vector<SlotTensorSpec> fp8_compute_specs(const TensorMap& stored, at::ScalarType compute_dtype);
int64_t tensor_map_bytes(const TensorMap& m);

struct Fp8WeightsStats {
  int64_t dequantised_blocks = 0;  // acquires that dequantised (the rest found the block in a slot)
  int64_t slot_bytes = 0;          // device memory of the dequantisation slots (0 with --fp8_matmul)
};

class Fp8BlockWeights : public BlockWeights {
 public:
  // inner: stored blocks on `device`. compute_specs[i]: fp8_compute_specs of block i (empty:
  // found by acquiring every block once). num_slots >= 1: dequantised blocks kept; one suffices
  // (the model holds one block at a time; the last block of forward is the first of backward).
  // hand_stored (--fp8_matmul): blocks pass through in their stored form; no slots, specs unused.
  Fp8BlockWeights(std::unique_ptr<BlockWeights> inner, at::ScalarType compute_dtype, c10::Device device,
                  std::vector<std::vector<SlotTensorSpec>> compute_specs = {}, int num_slots = 1,
                  bool hand_stored = false);
  ~Fp8BlockWeights() override;
  void forget_cached_blocks() override;  // unheld slots are emptied; the inner provider forgets too

  const TensorMap& globals() override { return inner_->globals(); }
  int num_blocks() const override { return inner_->num_blocks(); }
  const TensorMap& acquire(int block) override;
  void release(int block) override;
  void will_use(int block) override { inner_->will_use(block); }
  bool transient() const override { return true; }

  BlockWeights& inner() { return *inner_; }
  // --fp8_keep_transposed (hand_stored, inner provider unsharded): registers the codes of the
  // blocks the inner provider keeps resident with kernels::fp8_keep_transposed, so that their
  // transposes are made once and kept; unregistered (copies freed) with this provider. Streamed
  // blocks are left out: their slots are refilled with other blocks.
  void keep_transposed_codes();
  bool hands_stored() const { return !slots_; }
  const Fp8WeightsStats& stats() const { return stats_; }

 private:
  std::unique_ptr<BlockWeights> inner_;
  at::ScalarType dtype_;
  std::unique_ptr<BlockSlots> slots_;
  std::vector<bool> held_;
  std::vector<int64_t> last_use_;
  int64_t tick_ = 0;
  Fp8WeightsStats stats_;
  std::vector<at::Tensor> kept_transposed_;  // codes registered by keep_transposed_codes()
};

}  // namespace fluxtrain::dist
