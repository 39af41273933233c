#include "dist/offloaded_weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "core/error.h"

namespace fluxtrain::dist {
namespace {

// The CPU as the "device": copies are memcpy, nothing to order.
class CpuStreamEngine : public StreamEngine {
 public:
  at::Tensor host_buffer(int64_t bytes) override { return at::empty({bytes}, at::kByte); }
  at::Tensor device_buffer(int64_t bytes) override { return at::empty({bytes}, at::kByte); }
  void copy_to_slot(int, void* dst, const void* src, int64_t bytes) override {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
  }
  void slot_released(int) override {}
  void wait_filled(int) override {}
  void synchronize() override {}
};

}  // namespace

std::unique_ptr<StreamEngine> make_stream_engine(c10::Device device, int num_slots) {
  if (device.is_cpu()) return std::make_unique<CpuStreamEngine>();
#ifdef FLUXTRAIN_WITH_CUDA
  if (device.is_cuda()) return make_cuda_stream_engine(device, num_slots);
#endif
  throw Error("block streaming: device " + device.str() + " is not supported by this build");
}

#ifndef FLUXTRAIN_WITH_CUDA
double measure_host_to_device_bandwidth(c10::Device, int64_t, int) { return 0; }
#endif

std::vector<bool> spread_streamed_blocks(int n, int count) {
  std::vector<bool> s(static_cast<size_t>(std::max(n, 0)), false);
  count = std::clamp(count, 0, n);
  for (int k = 0; k < count; ++k) s[static_cast<size_t>((2 * k + 1) * static_cast<int64_t>(n) / (2 * count))] = true;
  return s;
}

int blocks_to_swap_for_budget(const std::vector<int64_t>& block_bytes, int64_t budget_bytes, int ring_slots) {
  const int n = static_cast<int>(block_bytes.size());
  for (int c = 0; c <= n; ++c) {
    const std::vector<bool> s = spread_streamed_blocks(n, c);
    int64_t resident = 0, largest = 0;
    for (int i = 0; i < n; ++i) {
      if (s[i]) largest = std::max(largest, block_bytes[i]);
      else resident += block_bytes[i];
    }
    if (resident + (c > 0 ? ring_slots * largest : 0) <= budget_bytes) return c;
  }
  return -1;
}

OffloadedBlockWeights::OffloadedBlockWeights(const TensorMap& globals, int num_blocks,
                                             const std::function<TensorMap(int)>& load_block,
                                             const OffloadOptions& opt)
    : opt_(opt) {
  if (opt_.prefetch < 0) throw Error("block streaming: prefetch must be >= 0", ErrorKind::Internal);
  if (!opt_.streamed.empty() && static_cast<int>(opt_.streamed.size()) != num_blocks)
    throw Error("block streaming: " + std::to_string(opt_.streamed.size()) + " streaming flags for " +
                    std::to_string(num_blocks) + " blocks",
                ErrorKind::Internal);
  streamed_ = opt_.streamed.empty() ? std::vector<bool>(num_blocks, true) : opt_.streamed;
  const int ring = opt_.prefetch + 1;
  engine_ = make_stream_engine(opt_.device, ring);
  at::NoGradGuard no_grad;
  for (const auto& [name, t] : globals) {
    at::Tensor g = t.detach().to(opt_.device, opt_.dtype.value_or(t.scalar_type())).contiguous();
    stats_.global_bytes += g.numel() * g.element_size();
    globals_.emplace(name, g);
  }
  std::vector<std::vector<SlotTensorSpec>> specs(num_blocks);
  resident_.resize(num_blocks);
  host_.resize(num_blocks);
  for (int b = 0; b < num_blocks; ++b) {
    TensorMap block = load_block(b);
    if (!streamed_[b]) {
      for (const auto& [name, t] : block) {
        at::Tensor d = t.detach().to(opt_.device, opt_.dtype.value_or(t.scalar_type())).contiguous();
        stats_.resident_block_bytes += d.numel() * d.element_size();
        resident_[b].emplace(name, d);
      }
      continue;
    }
    ++stats_.streamed_blocks;
    for (const auto& [name, t] : block) {
      check_input(t.defined(), "block streaming: block " + std::to_string(b) + ": " + name + " is undefined");
      specs[b].push_back({name, t.sizes().vec(), opt_.dtype.value_or(t.scalar_type())});
    }
    const int64_t bytes = BlockSlots::lay_out(specs[b]);
    host_[b] = engine_->host_buffer(std::max<int64_t>(bytes, 1));
    auto* base = static_cast<char*>(host_[b].data_ptr());
    for (const SlotTensorSpec& s : specs[b]) {
      // Packed at the slot offsets: one copy moves the whole block. copy_ casts as it goes.
      at::Tensor dst = at::from_blob(base + s.offset, s.shape, at::TensorOptions().dtype(s.dtype));
      dst.copy_(block.at(s.name).detach());
    }
    stats_.host_bytes += bytes;
  }
  if (stats_.streamed_blocks > 0) {
    slots_ = std::make_unique<BlockSlots>(opt_.device, std::move(specs), ring,
                                          [this](int64_t bytes) { return engine_->device_buffer(bytes); });
    state_.resize(ring);
    stats_.slot_bytes = ring * slots_->max_block_bytes();
  }
}

OffloadedBlockWeights::~OffloadedBlockWeights() {
  try {
    engine_->synchronize();  // copies in flight read host buffers and write slots freed below
  } catch (...) {
  }
  slots_.reset();
}

int OffloadedBlockWeights::free_slot(bool evict_unused) const {
  // An empty slot; else the least recently acquired slot whose block was used; a copied block
  // nobody acquired yet is about to be needed, so only an acquire may evict it.
  int best = -1;
  for (int s = 0; s < static_cast<int>(state_.size()); ++s) {
    if (state_[s].held) continue;
    if (slots_->block_in(s) < 0) return s;
    if (state_[s].used && (best < 0 || state_[s].last_use < state_[best].last_use)) best = s;
  }
  if (best >= 0 || !evict_unused) return best;
  for (int s = 0; s < static_cast<int>(state_.size()); ++s)
    if (!state_[s].held) return s;
  return -1;
}

void OffloadedBlockWeights::fill(int block, int slot) {
  if (slots_->block_in(slot) >= 0 && !state_[slot].used) ++stats_.wasted_prefetches;
  slots_->assign(block, slot);
  const int64_t bytes = slots_->block_bytes(block);
  engine_->copy_to_slot(slot, slots_->slot_data(slot), host_[block].data_ptr(), bytes);
  state_[slot].used = false;
  ++stats_.copies;
  stats_.bytes_copied += bytes;
}

void OffloadedBlockWeights::prefetch_from(int block) {
  int ahead = 0;
  for (int j = block + direction_; j >= 0 && j < num_blocks() && ahead < opt_.prefetch; j += direction_) {
    if (!streamed_[j]) continue;
    ++ahead;
    if (slots_->slot_of(j) >= 0) continue;
    const int s = free_slot(/*evict_unused=*/false);
    if (s < 0) return;
    fill(j, s);
  }
}

const TensorMap& OffloadedBlockWeights::resident_block(int block) const {
  check_input(block >= 0 && block < num_blocks() && !streamed_[block],
              "block streaming: block " + std::to_string(block) + " is not resident");
  return resident_[block];
}

const TensorMap& OffloadedBlockWeights::acquire(int block) {
  check_input(block >= 0 && block < num_blocks(),
              "block streaming: block " + std::to_string(block) + " out of range");
  if (last_acquired_ >= 0 && block != last_acquired_) direction_ = block > last_acquired_ ? +1 : -1;
  last_acquired_ = block;
  if (!streamed_[block]) {
    if (slots_) prefetch_from(block);
    return resident_[block];
  }
  int s = slots_->slot_of(block);
  if (s >= 0) {
    if (state_[s].held)
      throw Error("block streaming: block " + std::to_string(block) + " acquired twice without release()",
                  ErrorKind::Internal);
    ++stats_.prefetch_hits;
  } else {
    s = free_slot(/*evict_unused=*/true);
    if (s < 0)
      throw Error("block streaming: acquire(" + std::to_string(block) + ") while every slot is held",
                  ErrorKind::Internal);
    fill(block, s);
  }
  state_[s].held = true;
  state_[s].used = true;
  state_[s].last_use = ++tick_;
  prefetch_from(block);  // before waiting: the next copies queue behind this one
  engine_->wait_filled(s);
  return slots_->tensors(block);
}

void OffloadedBlockWeights::release(int block) {
  check_input(block >= 0 && block < num_blocks(),
              "block streaming: block " + std::to_string(block) + " out of range");
  if (!streamed_[block]) return;
  const int s = slots_->slot_of(block);
  if (s < 0 || !state_[s].held)
    throw Error("block streaming: release(" + std::to_string(block) + ") without acquire()", ErrorKind::Internal);
  state_[s].held = false;
  engine_->slot_released(s);
}

void OffloadedBlockWeights::will_use(int block) {
  if (block < 0 || block >= num_blocks() || !streamed_[block] || slots_->slot_of(block) >= 0) return;
  const int s = free_slot(/*evict_unused=*/false);
  if (s >= 0) fill(block, s);
}

}  // namespace fluxtrain::dist
