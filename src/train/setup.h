// Where a run is assembled: the one place that chooses the device and precision, creates the
// communicators, and chooses and composes the frozen-weights provider. `train`, `bench` and
// `forward` (and later `sample`) all go through here, so that they run the same configuration
// the same way.
//
// Providers: resident (model/block_weights.h) or sharded over the ranks (dist/sharded_weights.h).
// Low-memory providers (fp8 base weights, blocks streamed from host memory) stack on these in
// make_block_weights and nowhere else.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "core/tensor_map.h"
#include "dist/low_memory_options.h"
#include "model/block_weights.h"

namespace fluxtrain {

namespace dist {
class Communicator;
}

struct RuntimeRequest {
  std::string device = "auto";     // auto | cpu | cuda | cuda:N
  at::ScalarType dtype = at::kFloat;
  int rank = 0, world_size = 1;    // this process's place in the job
  int cuda_device = -1;            // from ProcessGroup::select_cuda_device; -1: cuda:0 (or the index in `device`)
  bool distributed = false;        // communicators needed (world > 1 or a sharded option)
  double nccl_timeout = 600;
  // Frozen blocks streamed from host memory (--blocks_to_swap / --max_gpu_memory): in a single
  // process the caching allocator then uses expandable segments (see make_runtime).
  bool streamed_weights = false;
};

struct Runtime {
  c10::Device device{c10::kCPU};
  at::ScalarType dtype = at::kFloat;
  int rank = 0, world_size = 1;
  // Null in a single process without sharding. Created in the same order on every rank.
  std::unique_ptr<dist::Communicator> weights_comm;  // all-gathers of sharded blocks
  std::unique_ptr<dist::Communicator> grad_comm;     // gradient averaging / sharded optimizer
  std::unique_ptr<dist::Communicator> ctl_comm;      // small host-side agreements (CPU)
  bool root() const { return rank == 0; }

  Runtime();
  Runtime(Runtime&&) noexcept;
  Runtime& operator=(Runtime&&) noexcept;
  ~Runtime();
};

// Chooses the device, checks the rank layout, creates the communicators (collective when
// distributed: needs dist::ProcessGroup::init() first).
Runtime make_runtime(const RuntimeRequest& r);

// The frozen weights as a provider reads them: the small global modules and the blocks one by
// one (a model file read block by block, or tensors already in memory).
struct WeightSource {
  TensorMap globals;
  int num_blocks = 0;
  int64_t depth = 0, depth_single = 0;
  std::function<TensorMap(int)> block;
  // Names and shapes of block i without reading it (optional; lets --max_gpu_memory plan
  // without a pass over the file).
  std::function<std::vector<std::pair<std::string, std::vector<int64_t>>>(int)> block_shapes;
};
class TransformerSource;
WeightSource weight_source(const TransformerSource& s);
// Tensors already in memory under full BFL names (e.g. random weights made on the device).
WeightSource weight_source(const TensorMap& full, int64_t depth, int64_t depth_single);

struct WeightsPlan {
  bool sharded = false;  // 1/N of each block per rank over runtime.weights_comm
  // fp8 base weights and block streaming (dist/low_memory_weights.h stacks them).
  dist::LowMemoryOptions low_memory;
  int64_t non_weight_bytes = 0;  // for --max_gpu_memory: activations, LoRA, optimizer, workspace
};

// The provider this run needs, with every weight on runtime.device in runtime.dtype (fp8
// blocks dequantised to it). `description`, when given, receives one line for the log.
std::unique_ptr<BlockWeights> make_block_weights(const Runtime& runtime, const WeightSource& source,
                                                 const WeightsPlan& plan, std::string* description = nullptr);

class T5Encoder;
// T5-XXL under the low-memory options (the guide's rows that train T5's LoRA): its frozen
// layers follow the transformer's --base_precision, and are all streamed from host memory
// when the transformer streams any block (the estimator counts three layers on the device:
// train/memory_estimate.cpp). No-op without fp8 or streaming. The embedding, norms and
// relative position bias stay on the device. Returns the plan's one line for the log.
// The layers are taken out of the encoder and each is dropped as soon as the stack has packed
// it, so host memory never holds the stored layers beside their packed copies (views of a
// file's mapping give their pages back as they go: core/safetensors.h). load_layer, when given,
// supplies layer i instead of the encoder's own (the bench's random T5, drawn a layer at a time).
std::string place_t5_low_memory(T5Encoder& t5, const dist::LowMemoryOptions& transformer, c10::Device device,
                                at::ScalarType dtype, const std::function<TensorMap(int)>& load_layer = {});

}  // namespace fluxtrain
