// BlockWeights: where each transformer block's frozen weights live, and how they reach the
// compute device just before the block runs. The model only calls acquire(i)/release(i);
// it never asks where weights are. Providers: resident (here), sharded (dist/), offloaded/fp8.
//
// Block index i: double-stream blocks are 0..depth-1, single-stream blocks depth..depth+single-1.
// Keys inside a block map are relative BFL names ("img_attn.qkv.weight", "linear1.weight").
// globals() holds the small non-block modules under their full BFL names ("img_in.weight", ...).
#pragma once
#include <memory>
#include <vector>

#include "core/tensor_map.h"

namespace fluxtrain {

class BlockWeights {
 public:
  virtual ~BlockWeights() = default;
  virtual const TensorMap& globals() = 0;
  virtual int num_blocks() const = 0;
  // Returns the block's full weights on the compute device; valid until release(i).
  virtual const TensorMap& acquire(int block) = 0;
  virtual void release(int block) = 0;
  // Hint: blocks will next be used in this order (forward: ascending; backward: descending).
  // Providers that prefetch use it; the default ignores it.
  virtual void will_use(int block) {}
  // True when weights handed out by acquire() may not outlive release(), so that a block
  // run with autograd must re-acquire them in backward (sharded, offloaded providers).
  virtual bool transient() const { return false; }
  // Forget which blocks device buffers hold, so that the next acquire of any block fills its
  // buffer anew. Called around CUDA-graph captures and replays (train/step_graphs.h): a replay
  // rewrites those buffers without the provider's host-side bookkeeping seeing it.
  virtual void forget_cached_blocks() {}
};

// All weights resident on one device. acquire/release are free.
class ResidentBlockWeights : public BlockWeights {
 public:
  // Splits a full BFL-named map into globals and per-block maps.
  ResidentBlockWeights(const TensorMap& full, int64_t depth, int64_t depth_single);
  const TensorMap& globals() override { return globals_; }
  int num_blocks() const override { return static_cast<int>(blocks_.size()); }
  const TensorMap& acquire(int block) override { return blocks_.at(block); }
  void release(int) override {}
  // Moves/casts every weight (e.g. to CUDA bf16).
  void to(const at::TensorOptions& opts);
  TensorMap full() const;  // back to one BFL-named map
  std::vector<TensorMap>& blocks() { return blocks_; }

 private:
  TensorMap globals_;
  std::vector<TensorMap> blocks_;
};

// "double_blocks.3." / "single_blocks.7." prefix for global block index i.
std::string block_prefix(int block, int64_t depth);

}  // namespace fluxtrain
