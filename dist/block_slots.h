// BlockSlots: a few device buffers ("slots") that blocks of frozen weights take turns in, and
// per-block tensors of stable identity that point into the slot their block occupies.
//
// Why stable identity: a block run with autograd but without recomputation keeps the graph of
// its forward, which saved the weight tensors it read; backward re-acquires the block, and the
// provider must then show those same tensor objects the block's values again, wherever the
// block landed (see model/block_runner.h). So each tensor of block i has its own StorageImpl,
// pointed at the slot's memory while block i occupies the slot and emptied (0 bytes) when the
// slot is given to another block -- a stale tensor can never show another block's weights.
// (The sharded provider does the same with its mapped windows.)
//
// Layout: block i's tensors, in name order, at 256-byte aligned offsets of one byte range
// (block_bytes(i)); every slot holds max_block_bytes(). Slot memory comes from `alloc`.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"

namespace fluxtrain::dist {

struct SlotTensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  at::ScalarType dtype;
  int64_t offset = 0;  // bytes from the start of the block's range (filled by BlockSlots)
  int64_t bytes() const;
};

class BlockSlots {
 public:
  static constexpr int64_t kAlign = 256;

  // Sorts specs by name and sets their 256-byte aligned offsets; returns the range's bytes.
  static int64_t lay_out(std::vector<SlotTensorSpec>& specs);

  // specs[i]: block i's tensors (empty for a block that never uses a slot).
  BlockSlots(c10::Device device, std::vector<std::vector<SlotTensorSpec>> specs, int num_slots,
             const std::function<at::Tensor(int64_t bytes)>& alloc);
  ~BlockSlots();
  BlockSlots(const BlockSlots&) = delete;
  BlockSlots& operator=(const BlockSlots&) = delete;

  int num_slots() const { return static_cast<int>(slots_.size()); }
  int64_t max_block_bytes() const { return max_bytes_; }
  int64_t block_bytes(int block) const { return block_bytes_[block]; }
  const std::vector<SlotTensorSpec>& specs(int block) const { return specs_[block]; }

  int slot_of(int block) const;             // -1 when the block is in no slot
  int block_in(int slot) const { return owner_[slot]; }
  char* slot_data(int slot) { return static_cast<char*>(slots_[slot].data_ptr()); }
  // Gives `slot` to `block` (the previous block's tensors are emptied) and returns the block's
  // tensors, which now show the slot's memory (contents unspecified until filled).
  const TensorMap& assign(int block, int slot);
  // Block's tensors (valid while it occupies a slot).
  const TensorMap& tensors(int block) const { return tensors_[block]; }
  // Fresh tensors over the same memory, for filling the slot with ATen ops: writing through
  // tensors(block) would bump their version counters, and autograd would then reject the
  // graphs that saved them ("modified by an inplace operation") when backward re-acquires.
  TensorMap fill_views(int block);
  void clear(int slot);

 private:
  c10::Device device_;
  std::vector<std::vector<SlotTensorSpec>> specs_;
  std::vector<int64_t> block_bytes_;
  int64_t max_bytes_ = 0;
  std::vector<at::Tensor> slots_;                  // byte buffers
  std::vector<int> owner_;                         // [slot] -> block or -1
  std::vector<std::vector<at::Storage>> storage_;  // [block][tensor]
  std::vector<TensorMap> tensors_;                 // [block], built on first assign
  void detach(int block);
};

}  // namespace fluxtrain::dist
