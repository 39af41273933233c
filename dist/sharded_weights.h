// ShardedBlockWeights: an FSDP-style BlockWeights provider over generic per-block TensorMaps.
//
// Layout (identical on every rank, derived from names, shapes, dtypes, world size and the
// mapping granularity only):
//   A block's tensors are grouped by dtype; within a group, tensors in name order are laid out
//   in one flat buffer, each starting at a multiple of kAlign elements. The group's buffer is
//   cut into world_size equal parts (each a multiple of the mapping granularity, so padding
//   is below one granule per rank); rank r keeps part r. Padding is zero.
//
// Memory (see mapped_memory.h): each (block, group) has two virtual windows of the full
// buffer's size, one per gather slot. In both windows, part `rank` is mapped from this rank's
// permanent shard memory; the other parts are mapped from slot 0's or slot 1's shared
// allocation (sized for the largest block's other parts). Gathering block i into slot s is an
// in-place all-gather in window s: only the other ranks' parts move, this rank's part is never
// copied. With one rank there is nothing to move at all.
//
// Lifecycle of a block's full weights:
//   will_use(i)  issues the all-gather of block i into a free gather slot if it is not
//                unsharded already (asynchronous: on NCCL it overlaps the compute queued
//                meanwhile; on MPI it is a non-blocking collective).
//   acquire(i)   waits for block i's gather (issuing it when no prefetch did), returns its
//                tensors, and prefetches the block after it in the current direction
//                (ascending after an ascending step, descending after a descending one) into
//                the other slot when that slot is free, so that communication overlaps compute
//                even when the model hints only the block it is about to acquire.
//   release(i)   makes the slot reusable. The data stays until the slot is reused, so
//                re-acquiring the same block right away costs nothing (the turn from forward
//                to backward finds the last two blocks still unsharded).
// There are two slots, so at most two blocks are unsharded at any time; acquiring a third
// while two are held throws.
//
// Tensor identity (what autograd relies on): acquire(i) returns the same tensor objects for
// block i every time. Their storage is block i's own StorageImpl, pointed at block i's window
// of the slot it occupies while block i is unsharded, and emptied (0 bytes) when that slot is
// reused for another block. So a graph that saved block i's weights in forward sees block i's
// values again once backward re-acquires block i, whichever slot it lands in; and a stale
// tensor can never show another block's weights.
//
// Collective contract: every rank must make the same sequence of acquire/will_use calls
// (true for the model: its control flow over blocks does not depend on the data). Give the
// provider its own communicator.
//
// globals() stay replicated (small: embedders, final layer).
//
// Streaming (options.streamed, --blocks_to_swap under --shard_weights): a streamed block's shard
// lives in host memory (page-locked on CUDA), packed group after group, instead of on the
// device. Such a block has no mapped windows: each gather slot has a plain device buffer the
// size of the largest streamed block, and gathering it copies this rank's part from host memory
// into its place in the slot's buffer (StreamEngine of dist/offloaded_weights.h), then
// all-gathers in place there. The two gather slots are the ring: the copy and the gather of the
// next block are issued when the block before it is acquired. On CUDA the copy runs on a side
// stream after the slot's last release, and the gather is issued from that stream so that it
// waits for the copy without holding up the compute queued meanwhile. Tensor identity is kept
// as above (the block's storage points at the slot's buffer while it is unsharded).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"
#include "dist/mapped_memory.h"
#include "model/block_weights.h"

namespace fluxtrain::dist {

class Communicator;
class StreamEngine;
class Work;

struct ShardedWeightsOptions {
  at::Device device = at::kCPU;              // where shards and gathered blocks live
  std::optional<at::ScalarType> dtype;       // cast every weight to this dtype (none: keep)
  bool prefetch = true;                      // issue the next block's gather ahead
  std::vector<bool> streamed;                // [block]: shard in host memory; empty: none
};

struct ShardedWeightsStats {
  int64_t full_block_bytes = 0;   // all blocks' weights, unpadded, as one rank would hold them
  int64_t shard_bytes = 0;        // this rank's shards of the blocks kept on the device (padding included)
  int64_t host_shard_bytes = 0;   // this rank's shards of the streamed blocks, in host memory
  int64_t replicated_bytes = 0;   // globals, held in full by every rank
  int64_t gather_buffer_bytes = 0;// the two slots receiving the other ranks' parts (0 on one rank)
  int64_t stream_buffer_bytes = 0;// the two slots receiving a whole streamed block
  int64_t granularity = 0;        // bytes: the mapping unit that parts are padded to
  int streamed_blocks = 0;
  int64_t resident_bytes() const {
    return shard_bytes + replicated_bytes + gather_buffer_bytes + stream_buffer_bytes;
  }
  int64_t gathers = 0;            // all-gathers issued so far
  int64_t prefetch_hits = 0;      // acquires whose block was already gathered or in flight
  int64_t wasted_prefetches = 0;  // gathers evicted before use
  int64_t shard_copies = 0;       // streamed shards copied from host memory to the device
  int64_t shard_bytes_copied = 0;
};

class ShardedBlockWeights : public BlockWeights {
 public:
  static constexpr int64_t kAlign = 64;  // elements; keeps views and shards 128-byte aligned in bf16

  // load_block(i) returns block i's full weights on any device (typically CPU memory mapped
  // from a file); only this rank's slice of each tensor is copied, so a rank never holds more
  // than one full block at a time. Collective: every rank constructs with the same layout
  // (checked: a mismatch throws on every rank).
  ShardedBlockWeights(Communicator& comm, const TensorMap& globals, int num_blocks,
                      const std::function<TensorMap(int)>& load_block, const ShardedWeightsOptions& opt);
  // Convenience: from blocks already in memory.
  ShardedBlockWeights(Communicator& comm, const TensorMap& globals, const std::vector<TensorMap>& blocks,
                      const ShardedWeightsOptions& opt);
  ~ShardedBlockWeights() override;

  const TensorMap& globals() override { return globals_; }
  int num_blocks() const override { return static_cast<int>(layouts_.size()); }
  const TensorMap& acquire(int block) override;
  void release(int block) override;
  void will_use(int block) override;
  bool transient() const override { return true; }

  const ShardedWeightsStats& stats() const { return stats_; }
  // Waits for any gather in flight (e.g. before destroying buffers or at the end of a step).
  void quiesce();

 private:
  struct Entry {
    std::string name;
    std::vector<int64_t> shape;
    int64_t offset = 0, numel = 0;  // within the group's flat buffer
  };
  struct Group {
    at::ScalarType dtype;
    std::vector<Entry> entries;
    int64_t part = 0;             // elements per rank; the full buffer has world * part
    int64_t part_bytes = 0;       // a multiple of the mapping granularity
    char* window[2] = {};         // the full buffer as seen through slot 0 / slot 1
    int64_t slot_offset = 0;      // bytes: where this group's other parts sit in a slot allocation
                                  // (streamed block: where the group sits in a stream buffer)
    int64_t own_offset = 0;       // bytes: where this rank's part sits in a packed (streamed) shard
    at::Tensor full[2], mine[2];  // flat views of a window and of this rank's part in it
  };
  struct Layout {
    std::vector<Group> groups;
  };
  struct Slot {
    int block = -1;
    bool held = false;
    bool used = false;                           // acquired since its gather was issued
    int64_t last_use = 0;                        // tick of the last acquire (LRU among free slots)
    std::vector<std::unique_ptr<Work>> pending;  // gathers in flight
  };

  Communicator& comm_;
  ShardedWeightsOptions opt_;
  // Declared first so that it is destroyed last: every view below points into its mappings.
  std::unique_ptr<MappedMemory> memory_;
  // Streaming: host copies of the streamed shards, and the engine that moves them (null when
  // nothing streams). Declared after memory_: the engine finishes its copies before unmapping.
  std::unique_ptr<StreamEngine> engine_;
  std::vector<bool> streamed_;
  std::vector<at::Tensor> host_;       // [block]: packed shard (streamed blocks only)
  std::vector<int64_t> own_bytes_;     // [block]: bytes of this rank's parts, all groups
  at::Tensor stream_buffer_[2];        // each slot's buffer for a whole streamed block
  TensorMap globals_;
  std::vector<Layout> layouts_;
  std::vector<std::vector<at::Storage>> storage_;  // [block][group]: the block's own storage
  std::vector<TensorMap> tensors_;                 // [block]: built on first use, then fixed
  Slot slots_[2];
  int last_acquired_ = -1;
  int direction_ = +1;
  int64_t tick_ = 0;
  ShardedWeightsStats stats_;

  void build(const std::function<TensorMap(int)>& load_block, int num_blocks);
  Slot* find_slot(int block);
  Slot* free_slot(bool allow_evict_unused);
  void start_gather(Slot& s, int block);
  int slot_index(const Slot& s) const { return &s == &slots_[0] ? 0 : 1; }
  void attach(Slot& s, int block);
  void detach(int block);
};

}  // namespace fluxtrain::dist
