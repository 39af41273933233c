#include "train/setup.h"

#include <cstdlib>

#include <c10/core/AllocatorConfig.h>

#include <ATen/DeviceAccelerator.h>

#include <ATen/ATen.h>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/process_group.h"
#include "dist/low_memory_weights.h"
#include "dist/sharded_weights.h"
#include "encoders/t5_encoder.h"
#include "model/blocks.h"
#include "model/flux_weights.h"

namespace fluxtrain {

Runtime::Runtime() = default;
Runtime::Runtime(Runtime&&) noexcept = default;
Runtime& Runtime::operator=(Runtime&&) noexcept = default;
Runtime::~Runtime() = default;

Runtime make_runtime(const RuntimeRequest& r) {
  Runtime rt;
  const std::string& d = r.device;
  const bool want_cuda = d.rfind("cuda", 0) == 0 || (d == "auto" && at::hasCUDA());
  if (want_cuda && !at::hasCUDA()) throw Error("--device " + d + ": this build or machine has no CUDA");
  if (want_cuda) {
    c10::DeviceIndex index = r.cuda_device >= 0 ? static_cast<c10::DeviceIndex>(r.cuda_device) : 0;
    if (r.cuda_device < 0 && d.size() > 5) index = c10::Device(d).index();
    rt.device = c10::Device(c10::kCUDA, index);
    // The attention backends `bench`, `forward` and `sample` use (model/blocks.h), so that
    // `train` runs the step the benchmark measures.
    configure_attention_backends();
    // Streamed blocks make the allocator cycle block-sized buffers of two sizes (double and single
    // blocks, fp8 and dequantised): with fixed segments that fragmented the 4 GiB row's reserve by
    // 1.3 GiB above its allocated peak (docs/memory.md). Expandable segments grow and shrink one
    // mapping instead. Not with several ranks (NCCL's buffers, not measured) and never over the
    // user's own allocator settings.
    if (r.streamed_weights && r.world_size == 1 && !std::getenv("PYTORCH_CUDA_ALLOC_CONF") &&
        !std::getenv("PYTORCH_ALLOC_CONF"))
      c10::CachingAllocator::setAllocatorSettings("expandable_segments:True");
  }
  rt.dtype = r.dtype;
  check_input(r.world_size >= 1 && r.rank >= 0 && r.rank < r.world_size, "runtime: bad rank/world size");
  rt.rank = r.rank;
  rt.world_size = r.world_size;
  if (r.distributed) {
    if (!dist::ProcessGroup::initialized())
      throw Error("--shard_weights / --shard_optimizer need MPI (run through `fluxtrain train`, which starts it)",
                  ErrorKind::Internal);
    dist::ProcessGroup& pg = dist::ProcessGroup::get();
    if (pg.rank() != r.rank || pg.world_size() != r.world_size)
      throw Error("runtime: rank/world size differ from the process group's", ErrorKind::Internal);
    rt.weights_comm = pg.make_communicator(rt.device, r.nccl_timeout);
    rt.grad_comm = pg.make_communicator(rt.device, r.nccl_timeout);
    rt.ctl_comm = pg.make_communicator(c10::Device(c10::kCPU));
  }
  return rt;
}

WeightSource weight_source(const TransformerSource& s) {
  WeightSource w;
  w.globals = s.globals();
  w.num_blocks = s.num_blocks();
  w.depth = s.config.depth;
  w.depth_single = s.config.depth_single;
  w.block = [s](int i) { return s.block(i); };
  return w;
}

WeightSource weight_source(const TensorMap& full, int64_t depth, int64_t depth_single) {
  auto split = std::make_shared<ResidentBlockWeights>(full, depth, depth_single);
  WeightSource w;
  w.globals = split->globals();
  w.num_blocks = split->num_blocks();
  w.depth = depth;
  w.depth_single = depth_single;
  w.block = [split](int i) { return split->acquire(i); };
  return w;
}

std::unique_ptr<BlockWeights> make_block_weights(const Runtime& runtime, const WeightSource& source,
                                                 const WeightsPlan& plan, std::string* description) {
  if (plan.low_memory.fp8() || plan.low_memory.streams()) {
    // fp8 and streamed providers stack on resident or sharded storage (dist/low_memory_weights.h).
    if (plan.sharded && !runtime.weights_comm)
      throw Error("sharded weights need the run's communicators", ErrorKind::Internal);
    dist::WeightsSource src;
    src.globals = source.globals;
    src.num_blocks = source.num_blocks;
    src.load_block = source.block;
    if (source.block_shapes) src.block_shapes = source.block_shapes;
    dist::LowMemoryPlan lp;
    auto w = dist::compose_low_memory_weights(src, plan.low_memory, runtime.device, runtime.dtype,
                                              plan.sharded ? runtime.weights_comm.get() : nullptr,
                                              plan.non_weight_bytes, &lp);
    if (description) *description = lp.describe();
    // Quantising and packing passed every block through the device once; give the caching
    // allocator's leftovers back so that the driver's view of the run starts at what it holds.
    if (!runtime.device.is_cpu()) at::accelerator::emptyCache();
    return w;
  }
  if (plan.sharded) {
    if (!runtime.weights_comm) throw Error("sharded weights need the run's communicators", ErrorKind::Internal);
    // Every rank keeps 1/N of each block; the full block is gathered just before it runs.
    // Blocks are read one at a time and only this rank's slice of each is cast.
    dist::ShardedWeightsOptions so;
    so.device = runtime.device;
    so.dtype = runtime.dtype;
    return std::make_unique<dist::ShardedBlockWeights>(*runtime.weights_comm, source.globals, source.num_blocks,
                                                       source.block, so);
  }
  // Each block is moved to the device (and cast) as it is read, so that its view of the file's
  // mapping is dropped before the next one is read: host memory holds about one block at a time
  // instead of the whole file (issue 14: peak RSS of a resident bf16 run was the file's 22.7 GiB).
  const auto opts = at::TensorOptions().device(runtime.device).dtype(runtime.dtype);
  TensorMap full;
  for (const auto& kv : source.globals) full.emplace(kv.first, kv.second.to(opts));
  for (int i = 0; i < source.num_blocks; ++i)
    for (auto& kv : source.block(i)) full.emplace(block_prefix(i, source.depth) + kv.first, kv.second.to(opts));
  return std::make_unique<ResidentBlockWeights>(full, source.depth, source.depth_single);
}

std::string place_t5_low_memory(T5Encoder& t5, const dist::LowMemoryOptions& transformer, c10::Device device,
                                at::ScalarType dtype, const std::function<TensorMap(int)>& load_layer) {
  if (!transformer.fp8() && !transformer.streams()) return "";
  dist::LowMemoryOptions o = transformer;
  o.fp8_matmul = false;  // the T5 code multiplies dequantised layers; fp8 GEMMs are the transformer's
  o.fp8_keep_transposed = false;
  o.max_gpu_memory.clear();
  o.blocks_to_swap = transformer.streams() ? -1 : 0;
  auto w = std::make_shared<EncoderLayerWeights>(t5.take_weights());
  std::vector<dist::BlockShapes> shapes;
  for (const auto& layer : w->layers_) {
    dist::BlockShapes sh;
    for (const auto& kv : layer) sh.emplace_back(kv.first, kv.second.sizes().vec());
    shapes.push_back(std::move(sh));
  }
  dist::WeightsSource src;
  src.globals = w->globals_;
  src.num_blocks = static_cast<int>(w->layers_.size());
  src.load_block = [w, load_layer](int i) {
    if (load_layer) return load_layer(i);
    TensorMap layer = std::move(w->layers_.at(static_cast<size_t>(i)));
    w->layers_[static_cast<size_t>(i)].clear();
    return layer;
  };
  src.block_shapes = [shapes](int i) { return shapes.at(static_cast<size_t>(i)); };
  dist::LowMemoryPlan plan;
  auto provider = dist::compose_low_memory_weights(src, o, device, dtype, nullptr, 0, &plan);
  t5.use_layer_provider(std::move(provider), dtype, device, plan.device_weight_bytes);
  if (!device.is_cpu()) at::accelerator::emptyCache();
  return "T5: " + plan.describe();
}

}  // namespace fluxtrain
