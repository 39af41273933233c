#include "dist/sharded_weights.h"

#include <algorithm>
#include <map>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/mapped_memory.h"
#include "dist/offloaded_weights.h"

namespace fluxtrain::dist {

namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// FNV-1a over the layout description: cheap agreement check across ranks.
struct Hasher {
  uint64_t h = 1469598103934665603ull;
  void bytes(const void* p, size_t n) {
    auto* c = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ c[i]) * 1099511628211ull;
  }
  void i64(int64_t v) { bytes(&v, sizeof v); }
  void str(const std::string& s) { i64(static_cast<int64_t>(s.size())); bytes(s.data(), s.size()); }
};

}  // namespace

ShardedBlockWeights::ShardedBlockWeights(Communicator& comm, const TensorMap& globals, int num_blocks,
                                         const std::function<TensorMap(int)>& load_block,
                                         const ShardedWeightsOptions& opt)
    : comm_(comm), opt_(opt) {
  memory_ = opt_.device.is_cuda() ? make_cuda_mapped_memory(opt_.device.index() < 0 ? 0 : opt_.device.index())
                                  : make_host_mapped_memory();
  stats_.granularity = static_cast<int64_t>(memory_->granularity());
  for (const auto& [name, t] : globals) {
    at::Tensor g = t.detach().to(opt_.device, opt_.dtype.value_or(t.scalar_type())).contiguous();
    stats_.replicated_bytes += g.numel() * g.element_size();
    globals_.emplace(name, g);
  }
  build(load_block, num_blocks);
}

ShardedBlockWeights::ShardedBlockWeights(Communicator& comm, const TensorMap& globals,
                                         const std::vector<TensorMap>& blocks, const ShardedWeightsOptions& opt)
    : ShardedBlockWeights(comm, globals, static_cast<int>(blocks.size()),
                          [&blocks](int i) { return blocks[i]; }, opt) {}

ShardedBlockWeights::~ShardedBlockWeights() {
  // Gathers in flight write into our windows (and, on MPI, are requests that must complete).
  try {
    quiesce();
    if (engine_) engine_->synchronize();  // shard copies in flight read host_ and write stream buffers
  } catch (...) {
  }
  // Tensors handed out may outlive us: leave them with empty storage, not unmapped addresses.
  for (int b = 0; b < static_cast<int>(storage_.size()); ++b) detach(b);
}

void ShardedBlockWeights::build(const std::function<TensorMap(int)>& load_block, int num_blocks) {
  const int world = comm_.size(), rank = comm_.rank();
  const int64_t granule = static_cast<int64_t>(memory_->granularity());
  const c10::Device dev = memory_->device();
  if (!opt_.streamed.empty() && static_cast<int>(opt_.streamed.size()) != num_blocks)
    throw Error("sharded weights: " + std::to_string(opt_.streamed.size()) + " streaming flags for " +
                    std::to_string(num_blocks) + " blocks",
                ErrorKind::Internal);
  streamed_ = opt_.streamed.empty() ? std::vector<bool>(num_blocks, false) : opt_.streamed;
  if (std::find(streamed_.begin(), streamed_.end(), true) != streamed_.end())
    engine_ = make_stream_engine(dev, /*num_slots=*/2);
  host_.resize(num_blocks);
  own_bytes_.assign(num_blocks, 0);
  layouts_.resize(num_blocks);
  int64_t slot_bytes = 0;     // the largest resident block's other parts, all groups together
  int64_t stream_bytes = 0;   // the largest streamed block, all parts of all groups
  Hasher hash;
  hash.i64(granule);
  for (int b = 0; b < num_blocks; ++b) {
    TensorMap full = load_block(b);
    std::map<at::ScalarType, Group> groups;
    std::map<at::ScalarType, int64_t> ends;
    for (const auto& [name, t] : full) {
      check_input(t.defined(), "sharded weights: block " + std::to_string(b) + ": " + name + " is undefined");
      const at::ScalarType dt = opt_.dtype.value_or(t.scalar_type());
      Group& g = groups.try_emplace(dt, Group{dt}).first->second;
      Entry e{name, t.sizes().vec(), round_up(ends[dt], kAlign), t.numel()};
      ends[dt] = e.offset + e.numel;
      g.entries.push_back(std::move(e));
    }
    // Part sizes first: a streamed shard is one packed host buffer of all groups' parts.
    for (auto& [dt, g] : groups) {
      const int64_t esize = static_cast<int64_t>(c10::elementSize(dt));
      if (granule % (esize * kAlign) != 0)
        throw Error("sharded weights: mapping granularity " + std::to_string(granule) + " bytes does not hold whole " +
                        std::to_string(kAlign) + "-element units",
                    ErrorKind::Internal);
      const int64_t unit = granule / esize;
      const int64_t used = std::max<int64_t>(ends[dt], 1);
      g.part = round_up((used + world - 1) / world, unit);
      g.part_bytes = g.part * esize;
      g.own_offset = own_bytes_[b];
      own_bytes_[b] += g.part_bytes;
      hash.i64(static_cast<int64_t>(dt));
      hash.i64(g.part);
      for (const Entry& e : g.entries) {
        hash.str(e.name);
        for (int64_t d : e.shape) hash.i64(d);
      }
    }
    const bool streamed = streamed_[b];
    if (streamed) {
      host_[b] = engine_->host_buffer(own_bytes_[b]);
      stats_.host_shard_bytes += own_bytes_[b];
      ++stats_.streamed_blocks;
    }
    int64_t others_offset = 0;  // running offset of this block's other parts inside a slot
    int64_t full_offset = 0;    // streamed: running offset of this block's groups in a stream buffer
    for (auto& [dt, g] : groups) {
      const int64_t esize = static_cast<int64_t>(c10::elementSize(dt));
      const at::TensorOptions o = at::TensorOptions().dtype(dt).device(dev);
      if (streamed) {
        // Gathered into a plain buffer of the slot (windows set below): its own part arrives by
        // copy, so there is no permanent memory to map (and CUDA maps whole allocations only).
        g.slot_offset = full_offset;
        full_offset += world * g.part_bytes;
      } else {
        // Two windows of the full buffer; this rank's part in both comes from its own memory.
        char* base = memory_->reserve(static_cast<size_t>(2 * world * g.part_bytes));
        const int own = memory_->create(static_cast<size_t>(g.part_bytes));
        for (int s = 0; s < 2; ++s) {
          g.window[s] = base + s * world * g.part_bytes;
          memory_->map(g.window[s] + rank * g.part_bytes, static_cast<size_t>(g.part_bytes), own, 0);
        }
        g.slot_offset = others_offset;
        others_offset += (world - 1) * g.part_bytes;
      }

      // This rank's slice of the flat buffer; only the overlapping part of each tensor is read.
      // (Views over a window are made once all of it is mapped: CUDA checks the address.)
      at::Tensor shard =
          streamed ? at::from_blob(static_cast<char*>(host_[b].data_ptr()) + g.own_offset, {g.part},
                                   at::TensorOptions().dtype(dt))
                   : at::from_blob(g.window[0] + rank * g.part_bytes, {g.part}, o);
      shard.zero_();
      const int64_t lo = rank * g.part, hi = lo + g.part;
      for (const Entry& e : g.entries) {
        const int64_t a = std::max(lo, e.offset), z = std::min(hi, e.offset + e.numel);
        if (a >= z) continue;
        at::Tensor src = full.at(e.name).detach().reshape({-1}).narrow(0, a - e.offset, z - a);
        shard.narrow(0, a - lo, z - a).copy_(src);  // copy_ converts dtype and device
      }
      if (!streamed) stats_.shard_bytes += g.part_bytes;
      for (const Entry& e : g.entries) stats_.full_block_bytes += e.numel * esize;
      layouts_[b].groups.push_back(std::move(g));
    }
    slot_bytes = std::max(slot_bytes, others_offset);
    stream_bytes = std::max(stream_bytes, full_offset);
    hash.i64(-1);  // block separator
  }

  // Streamed blocks are gathered into one of two plain device buffers, each holding a whole
  // block (the largest streamed one): the group's window is its place in the buffer.
  if (stream_bytes > 0) {
    for (int s = 0; s < 2; ++s) {
      stream_buffer_[s] = engine_->device_buffer(stream_bytes);
      char* base = static_cast<char*>(stream_buffer_[s].data_ptr());
      for (int b = 0; b < num_blocks; ++b)
        if (streamed_[b])
          for (Group& g : layouts_[b].groups) g.window[s] = base + g.slot_offset;
    }
    stats_.stream_buffer_bytes = 2 * stream_bytes;
  }

  // Every rank must have derived the same layout, or the gathers would mix tensors.
  at::Tensor mine = at::empty({1}, at::kLong);
  mine.fill_(static_cast<int64_t>(hash.h));
  at::Tensor all = comm_.all_gather(mine);
  for (int r = 0; r < world; ++r)
    check_input(all[r].item<int64_t>() == mine.item<int64_t>(),
                "sharded weights: rank " + std::to_string(r) + " has a different block layout than rank " +
                    std::to_string(rank) + " (different weights files or options?)");

  // The other ranks' parts of every window: from the slot's shared allocation (none on one rank).
  if (slot_bytes > 0) {
    for (int s = 0; s < 2; ++s) {
      const int slot_memory = memory_->create(static_cast<size_t>(slot_bytes));
      for (int b = 0; b < num_blocks; ++b)
        for (const Group& g : layouts_[b].groups) {
          if (streamed_[b]) continue;
          const int64_t pb = g.part_bytes;
          memory_->map(g.window[s], static_cast<size_t>(rank * pb), slot_memory, static_cast<size_t>(g.slot_offset));
          memory_->map(g.window[s] + (rank + 1) * pb, static_cast<size_t>((world - 1 - rank) * pb), slot_memory,
                       static_cast<size_t>(g.slot_offset + rank * pb));
        }
    }
    stats_.gather_buffer_bytes = 2 * slot_bytes;
  }
  // Flat views of every window, now that each is mapped in full.
  for (Layout& lay : layouts_)
    for (Group& g : lay.groups)
      for (int s = 0; s < 2; ++s) {
        g.full[s] = at::from_blob(g.window[s], {world * g.part}, at::TensorOptions().dtype(g.dtype).device(dev));
        g.mine[s] = g.full[s].narrow(0, rank * g.part, g.part);
      }

  // Each block group's own storage, empty until the block is unsharded. Not resizable and
  // without an allocator: its memory only ever comes from a window (attach) and goes (detach).
  storage_.resize(num_blocks);
  tensors_.resize(num_blocks);
  for (int b = 0; b < num_blocks; ++b)
    for (size_t g = 0; g < layouts_[b].groups.size(); ++g)
      storage_[b].emplace_back(at::Storage::use_byte_size_t(), size_t{0}, c10::DataPtr(nullptr, dev),
                               /*allocator=*/nullptr, /*resizable=*/false);
}

void ShardedBlockWeights::attach(Slot& s, int block) {
  const Layout& lay = layouts_[block];
  const int si = slot_index(s);
  const c10::Device dev = memory_->device();
  for (size_t g = 0; g < lay.groups.size(); ++g) {
    const Group& grp = lay.groups[g];
    c10::StorageImpl* st = storage_[block][g].unsafeGetStorageImpl();
    // Non-owning: the mapping lives as long as this provider.
    st->set_data_ptr_noswap(c10::DataPtr(grp.window[si], dev));
    st->set_nbytes(static_cast<size_t>(comm_.size() * grp.part_bytes));
  }
  if (tensors_[block].empty()) {
    // Built once, while the storage has its full size (set_ checks bounds); plain tensors over
    // the block's storage, not autograd views, so that they carry no base.
    at::NoGradGuard no_grad;
    for (size_t g = 0; g < lay.groups.size(); ++g) {
      const Group& grp = lay.groups[g];
      const at::TensorOptions o = at::TensorOptions().dtype(grp.dtype).device(dev);
      for (const Entry& e : grp.entries) {
        at::Tensor t = at::empty({0}, o);
        t.set_(storage_[block][g], e.offset, e.shape, c10::contiguous_strides(e.shape));
        tensors_[block].emplace(e.name, t);
      }
    }
  }
}

void ShardedBlockWeights::detach(int block) {
  for (at::Storage& st : storage_[block]) {
    st.unsafeGetStorageImpl()->set_data_ptr_noswap(c10::DataPtr(nullptr, st.device()));
    st.unsafeGetStorageImpl()->set_nbytes(0);
  }
}

ShardedBlockWeights::Slot* ShardedBlockWeights::find_slot(int block) {
  for (Slot& s : slots_)
    if (s.block == block && block >= 0) return &s;
  return nullptr;
}

ShardedBlockWeights::Slot* ShardedBlockWeights::free_slot(bool allow_evict_unused) {
  // Preference: an empty slot; else the least recently acquired slot whose block has been used;
  // a prefetched block nobody has acquired yet is about to be needed, so only an acquire (never
  // a hint) may evict it.
  Slot* best = nullptr;
  for (Slot& s : slots_) {
    if (s.held) continue;
    if (s.block < 0) return &s;
    if (s.used && (!best || s.last_use < best->last_use)) best = &s;
  }
  if (best || !allow_evict_unused) return best;
  for (Slot& s : slots_)
    if (!s.held) return &s;
  return nullptr;
}

void ShardedBlockWeights::start_gather(Slot& s, int block) {
  for (auto& w : s.pending) w->wait();
  if (!s.pending.empty() && !s.used) ++stats_.wasted_prefetches;
  s.pending.clear();
  if (s.block >= 0) detach(s.block);
  s.block = block;
  s.used = false;
  attach(s, block);
  // In place: this rank's part is already in the window, only the others' parts arrive.
  Layout& lay = layouts_[block];
  const int si = slot_index(s);
  auto gather = [&] {
    for (Group& g : lay.groups) s.pending.push_back(comm_.all_gather_async(g.full[si], g.mine[si]));
  };
  if (streamed_[block]) {
    // A streamed shard first comes from host memory into this rank's part of the slot's stream
    // buffer (one copy per dtype group); the gather is ordered after those copies.
    const char* host = static_cast<const char*>(host_[block].data_ptr());
    for (const Group& g : lay.groups)
      engine_->copy_to_slot(si, g.window[si] + comm_.rank() * g.part_bytes, host + g.own_offset, g.part_bytes);
    ++stats_.shard_copies;
    stats_.shard_bytes_copied += own_bytes_[block];
    engine_->after_copy(si, gather);
  } else {
    gather();
  }
  ++stats_.gathers;
}

const TensorMap& ShardedBlockWeights::acquire(int block) {
  check_input(block >= 0 && block < num_blocks(),
              "sharded weights: block " + std::to_string(block) + " out of range");
  Slot* s = find_slot(block);
  if (s) {
    if (s->held)
      throw Error("sharded weights: block " + std::to_string(block) + " acquired twice without release()",
                  ErrorKind::Internal);
    ++stats_.prefetch_hits;
  } else {
    s = free_slot(/*allow_evict_unused=*/true);
    if (!s)
      throw Error("sharded weights: acquire(" + std::to_string(block) + ") while blocks " +
                      std::to_string(slots_[0].block) + " and " + std::to_string(slots_[1].block) +
                      " are held; at most two blocks may be unsharded at once",
                  ErrorKind::Internal);
    start_gather(*s, block);
  }
  for (auto& w : s->pending) w->wait();
  s->pending.clear();
  // The gather already follows the shard's copy; waiting for the copy as well keeps the order
  // when the communicator has nothing to move (one rank).
  if (streamed_[block]) engine_->wait_filled(slot_index(*s));
  s->held = true;
  s->used = true;
  s->last_use = ++tick_;

  if (last_acquired_ >= 0 && block != last_acquired_) direction_ = block > last_acquired_ ? +1 : -1;
  last_acquired_ = block;
  if (opt_.prefetch) will_use(block + direction_);
  return tensors_[block];
}

void ShardedBlockWeights::release(int block) {
  Slot* s = find_slot(block);
  if (!s || !s->held)
    throw Error("sharded weights: release(" + std::to_string(block) + ") without acquire()", ErrorKind::Internal);
  s->held = false;
  // The slot's readers are queued: a later shard copy into its stream buffer waits for them.
  if (engine_) engine_->slot_released(slot_index(*s));
}

void ShardedBlockWeights::will_use(int block) {
  if (!opt_.prefetch || block < 0 || block >= num_blocks() || find_slot(block)) return;
  if (Slot* s = free_slot(/*allow_evict_unused=*/false)) start_gather(*s, block);
}

void ShardedBlockWeights::quiesce() {
  for (Slot& s : slots_) {
    for (auto& w : s.pending) w->wait();
    s.pending.clear();
  }
}

}  // namespace fluxtrain::dist
