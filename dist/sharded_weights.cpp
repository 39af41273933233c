#include "dist/sharded_weights.h"

#include <algorithm>
#include <map>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "core/error.h"
#include "dist/communicator.h"

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
  // Gathers in flight write into our buffers (and, on MPI, are requests that must complete).
  try {
    quiesce();
  } catch (...) {
  }
}

void ShardedBlockWeights::build(const std::function<TensorMap(int)>& load_block, int num_blocks) {
  const int world = comm_.size(), rank = comm_.rank();
  const int64_t unit = world * kAlign;
  layouts_.resize(num_blocks);
  shards_.resize(num_blocks);
  std::map<at::ScalarType, int64_t> capacity;  // max padded length per dtype over blocks
  Hasher hash;
  for (int b = 0; b < num_blocks; ++b) {
    TensorMap full = load_block(b);
    std::map<at::ScalarType, Group> groups;
    for (const auto& [name, t] : full) {
      check_input(t.defined(), "sharded weights: block " + std::to_string(b) + ": " + name + " is undefined");
      const at::ScalarType dt = opt_.dtype.value_or(t.scalar_type());
      Group& g = groups.try_emplace(dt, Group{dt, {}, 0, 0}).first->second;
      Entry e{name, t.sizes().vec(), 0, t.numel()};
      e.offset = g.padded;  // `padded` doubles as the running end while laying out
      g.padded = round_up(e.offset + e.numel, kAlign);
      g.entries.push_back(std::move(e));
    }
    for (auto& [dt, g] : groups) {
      g.padded = round_up(std::max<int64_t>(g.padded, 1), unit);
      g.shard = g.padded / world;
      capacity[dt] = std::max(capacity[dt], g.padded);
      hash.i64(static_cast<int64_t>(dt));
      for (const Entry& e : g.entries) {
        hash.str(e.name);
        for (int64_t d : e.shape) hash.i64(d);
      }
      // This rank's slice of the flat buffer; only the overlapping part of each tensor is read.
      const int64_t lo = rank * g.shard, hi = lo + g.shard;
      at::Tensor shard = at::zeros({g.shard}, at::TensorOptions().dtype(dt).device(opt_.device));
      for (const Entry& e : g.entries) {
        const int64_t a = std::max(lo, e.offset), z = std::min(hi, e.offset + e.numel);
        if (a >= z) continue;
        at::Tensor src = full.at(e.name).detach().reshape({-1}).narrow(0, a - e.offset, z - a);
        shard.narrow(0, a - lo, z - a).copy_(src);  // copy_ converts dtype and device
      }
      stats_.shard_bytes += shard.numel() * shard.element_size();
      for (const Entry& e : g.entries) stats_.full_block_bytes += e.numel * shard.element_size();
      layouts_[b].groups.push_back(std::move(g));
      shards_[b].push_back(shard);
    }
    hash.i64(-1);  // block separator
  }

  // Every rank must have derived the same layout, or the gathers would mix tensors.
  at::Tensor mine = at::empty({1}, at::kLong);
  mine.fill_(static_cast<int64_t>(hash.h));
  at::Tensor all = comm_.all_gather(mine);
  for (int r = 0; r < world; ++r)
    check_input(all[r].item<int64_t>() == mine.item<int64_t>(),
                "sharded weights: rank " + std::to_string(r) + " has a different block layout than rank " +
                    std::to_string(rank) + " (different weights files or options?)");

  for (const auto& [dt, cap] : capacity) group_dtypes_.push_back(dt);
  for (Slot& s : slots_) {
    for (at::ScalarType dt : group_dtypes_) {
      s.buffers.push_back(at::empty({capacity[dt]}, at::TensorOptions().dtype(dt).device(opt_.device)));
      stats_.gather_buffer_bytes += capacity[dt] * s.buffers.back().element_size();
    }
  }
  // Each block group's own storage, empty until the block is unsharded. Not resizable and
  // without an allocator: its memory only ever comes from a slot (attach) and goes (detach).
  storage_.resize(num_blocks);
  tensors_.resize(num_blocks);
  for (int b = 0; b < num_blocks; ++b)
    for (const Group& g : layouts_[b].groups) {
      const at::Device dev = slots_[0].buffers[dtype_index(g.dtype)].device();  // with its index
      storage_[b].emplace_back(at::Storage::use_byte_size_t(), size_t{0}, c10::DataPtr(nullptr, dev),
                               /*allocator=*/nullptr, /*resizable=*/false);
    }
}

size_t ShardedBlockWeights::dtype_index(at::ScalarType dt) const {
  return std::find(group_dtypes_.begin(), group_dtypes_.end(), dt) - group_dtypes_.begin();
}

void ShardedBlockWeights::attach(Slot& s, int block) {
  const Layout& lay = layouts_[block];
  for (size_t g = 0; g < lay.groups.size(); ++g) {
    const Group& grp = lay.groups[g];
    const at::Tensor& buf = s.buffers[dtype_index(grp.dtype)];
    c10::StorageImpl* st = storage_[block][g].unsafeGetStorageImpl();
    // Non-owning: the slot buffer owns the memory and outlives every attachment.
    st->set_data_ptr_noswap(c10::DataPtr(buf.data_ptr(), buf.device()));
    st->set_nbytes(static_cast<size_t>(grp.padded) * buf.element_size());
  }
  if (tensors_[block].empty()) {
    // Built once, while the storage has its full size (set_ checks bounds); plain tensors over
    // the block's storage, not autograd views, so that they carry no base.
    at::NoGradGuard no_grad;
    for (size_t g = 0; g < lay.groups.size(); ++g) {
      const Group& grp = lay.groups[g];
      const at::TensorOptions o = at::TensorOptions().dtype(grp.dtype).device(storage_[block][g].device());
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
  const Layout& lay = layouts_[block];
  for (size_t g = 0; g < lay.groups.size(); ++g) {
    const Group& grp = lay.groups[g];
    at::Tensor out = s.buffers[dtype_index(grp.dtype)].narrow(0, 0, grp.padded);
    s.pending.push_back(comm_.all_gather_async(out, shards_[block][g]));
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
