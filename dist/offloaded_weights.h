// OffloadedBlockWeights: block streaming. Frozen blocks live in host memory (pinned, on CUDA),
// each packed in the layout of a device slot, and are copied into a small ring of device
// slots just before use -- on a side stream, `prefetch` blocks ahead in the direction of the
// pass (ascending in forward, descending in backward), so that copies overlap compute.
// Blocks not chosen for streaming (partial offload, --blocks_to_swap) stay resident on the
// device and cost nothing to acquire.
//
// Memory on the device: the resident blocks + (prefetch + 1) slots of the largest streamed
// block + globals. On the host: the streamed blocks, packed (each one contiguous copy).
//
// Ordering on CUDA (dist/offloaded_weights_cuda.cpp): a copy into a slot waits for the event
// recorded on the compute stream when the slot's previous block was last released (its readers
// are queued before it); acquire() makes the compute stream wait for the slot's copy. On the
// CPU the "device" is the CPU and copies are plain memcpy: the same slot logic runs, so the
// tests exercise it.
//
// Tensor identity: as in dist/block_slots.h, block i's tensors are the same objects on every
// acquire, so graphs kept from forward see the block again once backward re-acquires it.
// Composition: wrap in dist::Fp8BlockWeights with fp8 stored blocks to stream half the bytes.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "dist/block_slots.h"
#include "model/block_weights.h"

namespace fluxtrain::dist {

// Host <-> device plumbing of the streaming provider (CPU: synchronous; CUDA: side stream).
class StreamEngine {
 public:
  virtual ~StreamEngine() = default;
  virtual at::Tensor host_buffer(int64_t bytes) = 0;    // CPU bytes; page-locked on CUDA
  virtual at::Tensor device_buffer(int64_t bytes) = 0;  // bytes on the device
  // Copies after the slot's last release; asynchronous on CUDA.
  virtual void copy_to_slot(int slot, void* dst, const void* src, int64_t bytes) = 0;
  virtual void slot_released(int slot) = 0;  // the slot's readers are queued on the compute stream
  virtual void wait_filled(int slot) = 0;    // the compute stream waits for the slot's copy
  virtual void synchronize() = 0;            // every copy issued is done
  // Calls `enqueue` (work for another queue, e.g. a collective that reads the slot) so that it
  // is ordered after the slot's last copy. CUDA: the side stream is the current stream while it
  // runs, so the work waits for the copy and not for the compute queued since. CPU: just calls.
  virtual void after_copy(int /*slot*/, const std::function<void()>& enqueue) { enqueue(); }
};
std::unique_ptr<StreamEngine> make_stream_engine(c10::Device device, int num_slots);
#ifdef FLUXTRAIN_WITH_CUDA
std::unique_ptr<StreamEngine> make_cuda_stream_engine(c10::Device device, int num_slots);
#endif

// Host-to-device bandwidth in bytes per second (page-locked source, `bytes` per copy, best of
// `reps`); 0 on a CPU-only build or device.
double measure_host_to_device_bandwidth(c10::Device device, int64_t bytes = 256ll << 20, int reps = 5);

// Which of n blocks are streamed when `count` are: spread evenly (the copy of a streamed block
// then overlaps the compute of the resident blocks around it). count >= n: all.
std::vector<bool> spread_streamed_blocks(int n, int count);
// The fewest streamed blocks (spread as above) such that resident blocks plus `ring_slots`
// slots of the largest streamed block fit in `budget_bytes`; -1 when even streaming all does not.
int blocks_to_swap_for_budget(const std::vector<int64_t>& block_bytes, int64_t budget_bytes, int ring_slots);

struct OffloadOptions {
  c10::Device device = at::kCPU;         // compute device
  std::optional<at::ScalarType> dtype;   // cast every weight (none: keep each tensor's dtype)
  int prefetch = 1;                      // blocks copied ahead; the ring has prefetch + 1 slots
  std::vector<bool> streamed;            // [block]: true = host memory; empty = all streamed
};

struct OffloadStats {
  int64_t host_bytes = 0;             // streamed blocks in host memory
  int64_t resident_block_bytes = 0;   // blocks kept on the device
  int64_t slot_bytes = 0;             // the ring of device slots
  int64_t global_bytes = 0;           // globals on the device
  int streamed_blocks = 0;
  int64_t copies = 0;                 // block copies issued
  int64_t bytes_copied = 0;
  int64_t prefetch_hits = 0;          // acquires that found their block copied or in flight
  int64_t wasted_prefetches = 0;      // copies evicted before use
  int64_t device_bytes() const { return resident_block_bytes + slot_bytes + global_bytes; }
};

class OffloadedBlockWeights : public BlockWeights {
 public:
  // load_block(i): block i's weights on any device (typically CPU, mapped from a file); only
  // one block is held at a time while the provider is built.
  OffloadedBlockWeights(const TensorMap& globals, int num_blocks, const std::function<TensorMap(int)>& load_block,
                        const OffloadOptions& opt);
  ~OffloadedBlockWeights() override;

  const TensorMap& globals() override { return globals_; }
  int num_blocks() const override { return static_cast<int>(streamed_.size()); }
  const TensorMap& acquire(int block) override;
  void release(int block) override;
  void will_use(int block) override;
  bool transient() const override { return stats_.streamed_blocks > 0; }

  bool streamed(int block) const { return streamed_[block]; }
  // A block kept on the device (not streamed): its tensors, which never change.
  const TensorMap& resident_block(int block) const;
  const OffloadStats& stats() const { return stats_; }
  void quiesce() { engine_->synchronize(); }

 private:
  OffloadOptions opt_;
  std::unique_ptr<StreamEngine> engine_;
  TensorMap globals_;
  std::vector<bool> streamed_;
  std::vector<TensorMap> resident_;  // non-streamed blocks, on the device
  std::vector<at::Tensor> host_;     // streamed blocks, packed
  std::unique_ptr<BlockSlots> slots_;
  struct SlotState {
    bool held = false, used = false;
    int64_t last_use = 0;
  };
  std::vector<SlotState> state_;
  int last_acquired_ = -1, direction_ = +1;
  int64_t tick_ = 0;
  OffloadStats stats_;

  int free_slot(bool evict_unused) const;
  void fill(int block, int slot);
  void prefetch_from(int block);
};

}  // namespace fluxtrain::dist
