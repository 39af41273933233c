#include "dist/low_memory_weights.h"

#include <algorithm>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/fp8_weights.h"
#include "dist/offloaded_weights.h"
#include "dist/sharded_weights.h"

namespace fluxtrain::dist {
namespace {

Fp8WeightsOptions fp8_options(const LowMemoryOptions& o) {
  Fp8WeightsOptions f;
  f.scaling = o.fp8_scaling == "tensor" ? kernels::Fp8Scaling::PerTensor : kernels::Fp8Scaling::PerChannel;
  f.quantise_modulation = o.fp8_modulation;
  return f;
}

BlockShapes shapes_of(const WeightsSource& src, int i) {
  if (src.block_shapes) return src.block_shapes(i);
  BlockShapes s;
  for (const auto& [name, t] : src.load_block(i)) s.emplace_back(name, t.sizes().vec());
  return s;
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string gib(int64_t b) {
  std::ostringstream s;
  s.precision(2);
  s << std::fixed << static_cast<double>(b) / (1ll << 30) << " GiB";
  return s.str();
}

}  // namespace

std::string LowMemoryPlan::describe() const {
  std::ostringstream s;
  s << "frozen blocks " << (fp8 ? (fp8_matmul ? "fp8 (fp8 GEMMs)" : "fp8") : "in the compute dtype") << ", "
    << streamed_blocks
    << " streamed from host memory" << (shard_ranks > 0 ? " (each rank its 1/" + std::to_string(shard_ranks) + ")" : "")
    << "; weights on the device " << gib(device_weight_bytes)
    << (kept_transposed_bytes > 0 ? " (with transposed codes kept: " + gib(kept_transposed_bytes) + ")" : "")
    << ", in host memory " << gib(host_weight_bytes);
  return s.str();
}

LowMemoryPlan plan_low_memory_weights(const WeightsSource& src, const LowMemoryOptions& opt, at::ScalarType dtype,
                                      int64_t non_weight_bytes, int shard_ranks) {
  opt.validate();
  check_input(shard_ranks >= 0, "low-memory plan: shard_ranks must be >= 0");
  LowMemoryPlan p;
  p.fp8 = opt.fp8();
  p.fp8_matmul = opt.fp8_matmul;
  p.shard_ranks = shard_ranks;
  const int n = src.num_blocks;
  const int64_t esize = static_cast<int64_t>(c10::elementSize(dtype));
  const Fp8WeightsOptions fo = fp8_options(opt);
  const int64_t N = std::max(shard_ranks, 1);
  std::vector<int64_t> stored(n), mine(n);  // whole block; this rank's share of it
  std::vector<int64_t> codes(n);            // bytes of a block's e4m3 codes (fp8)
  int64_t largest_compute = 0, largest_weight = 0;  // a block, one quantised weight (compute dtype)
  // Without shapes, counting bytes means reading every block: only worth it for a budget.
  const bool counted = src.block_shapes || !opt.max_gpu_memory.empty();
  for (int i = 0; i < n && counted; ++i) {
    const BlockShapes sh = shapes_of(src, i);
    int64_t compute = 0;
    for (const auto& kv : sh) {
      compute += numel(kv.second) * esize;
      if (fp8_quantisable(kv.first, static_cast<int64_t>(kv.second.size()), fo)) {
        largest_weight = std::max(largest_weight, numel(kv.second) * esize);
        codes[i] += numel(kv.second);
      }
    }
    stored[i] = p.fp8 ? fp8_stored_bytes(sh, fo, dtype) : compute;
    mine[i] = (stored[i] + N - 1) / N;  // sharded: 1/N of it (padding not counted)
    largest_compute = std::max(largest_compute, compute);
    p.stored_block_bytes += stored[i];
  }
  int64_t globals = 0;
  for (const auto& kv : src.globals) globals += kv.second.numel() * esize;
  // The fp8 layer's one dequantisation slot. With --fp8_matmul there is none (blocks are handed
  // as stored); what stays is the transient compute-dtype copy of one weight that the products
  // _scaled_mm does not take make per call (kernels/fp8_matmul.h, Dequantise).
  const int64_t fixed = globals + (!p.fp8 ? 0 : opt.fp8_matmul ? largest_weight : largest_compute);
  const int ring = static_cast<int>(opt.offload_prefetch) + 1;
  // --fp8_keep_transposed (unsharded): a resident block's codes once more, transposed.
  const auto kept_codes = [&](int i) { return opt.fp8_keep_transposed && shard_ranks == 0 ? codes[i] : int64_t{0}; };
  // Device bytes of the weights with `c` streamed blocks. Unsharded: resident blocks and a ring
  // of slots of the largest streamed block. Sharded (ShardedBlockWeights): this rank's 1/N of
  // each resident block, two gather slots for the other ranks' parts of the largest resident
  // block, and two buffers of the largest streamed block, whole (its own part arrives there by
  // copy, the others' by the gather).
  auto device_bytes = [&](int c) {
    const std::vector<bool> s = spread_streamed_blocks(n, c);
    int64_t resident = 0, largest_resident = 0, largest_streamed = 0;
    for (int i = 0; i < n; ++i) {
      if (s[i]) {
        largest_streamed = std::max(largest_streamed, shard_ranks > 0 ? stored[i] : mine[i]);
      } else {
        resident += mine[i] + kept_codes(i);
        largest_resident = std::max(largest_resident, stored[i]);
      }
    }
    if (shard_ranks == 0) return fixed + resident + (c > 0 ? ring * largest_streamed : 0);
    return fixed + resident + 2 * (largest_resident - largest_resident / N) + 2 * largest_streamed;
  };
  int count = opt.blocks_to_swap < 0 ? n : static_cast<int>(std::min<int64_t>(opt.blocks_to_swap, n));
  if (!opt.max_gpu_memory.empty()) {
    const int64_t budget = opt.max_gpu_memory_bytes() - non_weight_bytes;
    count = -1;
    for (int c = 0; c <= n && count < 0; ++c)  // the fewest streamed blocks that fit
      if (device_bytes(c) <= budget) count = c;
    if (count < 0)
      throw Error("--max_gpu_memory " + opt.max_gpu_memory + ": too small; with every block streamed the weights need " +
                  gib(device_bytes(n)) + " on the device and the rest of the step about " + gib(non_weight_bytes) +
                  (p.fp8 ? "" : " (--base_precision fp8 halves the blocks)"));
  }
  const std::vector<bool> s = spread_streamed_blocks(n, count);
  p.streamed_blocks = count;
  p.device_weight_bytes = device_bytes(count);
  for (int i = 0; i < n; ++i) {
    if (s[i]) p.host_weight_bytes += mine[i];
    else p.kept_transposed_bytes += kept_codes(i);
  }
  return p;
}

const OffloadStats* find_offload_stats(BlockWeights& stack) {
  BlockWeights* w = &stack;
  if (auto* f = dynamic_cast<Fp8BlockWeights*>(w)) w = &f->inner();
  auto* o = dynamic_cast<OffloadedBlockWeights*>(w);
  return o && o->stats().streamed_blocks > 0 ? &o->stats() : nullptr;
}

std::unique_ptr<BlockWeights> compose_low_memory_weights(const WeightsSource& src, const LowMemoryOptions& opt,
                                                         c10::Device device, at::ScalarType dtype, Communicator* comm,
                                                         int64_t non_weight_bytes, LowMemoryPlan* plan_out) {
  // Sharded streaming moves shards through the provider's two gather slots: the next block's
  // copy and gather are issued one block ahead, a ring that --offload_prefetch cannot widen.
  if (comm && opt.streams() && opt.offload_prefetch != 1)
    throw Error("--offload_prefetch " + std::to_string(opt.offload_prefetch) +
                " with --shard_weights: sharded streaming prefetches exactly 1 block (its two gather slots); leave "
                "--offload_prefetch at 1");
  if (comm && opt.fp8_keep_transposed)
    throw Error("--fp8_keep_transposed: blocks sharded over ranks are gathered per use, so nothing resident is "
                "kept; leave it off with --shard_weights");
  const LowMemoryPlan plan = plan_low_memory_weights(src, opt, dtype, non_weight_bytes, comm ? comm->size() : 0);
  if (plan_out) *plan_out = plan;
  const int n = src.num_blocks;
  TensorMap globals;
  for (const auto& [k, v] : src.globals) globals.emplace(k, v.detach().to(device, dtype));

  // The stored form of block i; the fp8 layer's slot layout is recorded as blocks go by.
  const Fp8WeightsOptions fo = fp8_options(opt);
  std::vector<std::vector<SlotTensorSpec>> specs(n);
  auto stored_block = [&](int i) {
    TensorMap b = src.load_block(i);
    if (!plan.fp8) return b;
    at::NoGradGuard no_grad;
    if (device.is_cuda())  // quantise where it is fast; the provider moves the result where it lives
      for (auto& kv : b) kv.second = kv.second.to(device);
    TensorMap q = quantise_block_fp8(b, fo, dtype);
    specs[i] = fp8_compute_specs(q, dtype);
    return q;
  };

  std::unique_ptr<BlockWeights> inner;
  if (comm) {
    ShardedWeightsOptions so;
    so.device = device;
    if (!plan.fp8) so.dtype = dtype;  // fp8: each group keeps its dtype (codes, scales, the rest)
    // Streamed: this rank's shard of the block in host memory; fp8 streams codes and scales.
    if (plan.streamed_blocks > 0) so.streamed = spread_streamed_blocks(n, plan.streamed_blocks);
    inner = std::make_unique<ShardedBlockWeights>(*comm, globals, n, stored_block, so);
  } else {
    OffloadOptions oo;
    oo.device = device;
    if (!plan.fp8) oo.dtype = dtype;
    oo.prefetch = static_cast<int>(opt.offload_prefetch);
    oo.streamed = spread_streamed_blocks(n, plan.streamed_blocks);
    inner = std::make_unique<OffloadedBlockWeights>(globals, n, stored_block, oo);
  }
  if (!plan.fp8) return inner;
  auto fp8 = std::make_unique<Fp8BlockWeights>(std::move(inner), dtype, device, std::move(specs), 1, opt.fp8_matmul);
  if (opt.fp8_keep_transposed) fp8->keep_transposed_codes();
  return fp8;
}

}  // namespace fluxtrain::dist
