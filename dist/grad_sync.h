// Gradients of replicated trainable parameters (LoRA) across data-parallel ranks.
//
// GradSync (replicated optimizer): gradients are averaged over ranks in buckets. With overlap,
// a post-accumulate-grad hook on each parameter marks it ready during backward, and a bucket's
// all-reduce is issued as soon as all its parameters are ready and every earlier bucket has
// been issued, so communication runs while backward continues. Buckets are always issued in
// the same order on every rank, whatever order the hooks fire in; finish() issues what is left,
// waits, and writes the averages back into p.grad().
//
// With --shard_optimizer the gradients are reduce-scattered instead, by the sharded optimizer
// itself (src/train/sharded_adamw.cpp): its math is the trainer's, its collectives are ours.
//
// Parameters must be floating tensors on one device kind that the communicator handles.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"

namespace fluxtrain::dist {

class Communicator;
class Work;

struct GradSyncOptions {
  int64_t bucket_bytes = 25ll << 20;  // gradient bytes per all-reduce
  bool overlap = true;                // issue buckets from hooks during backward
};

class GradSync {
 public:
  // params: the trainable tensors (requires_grad leaves). Installs hooks when overlapping.
  GradSync(Communicator& comm, std::vector<at::Tensor> params, const GradSyncOptions& opt = {});
  ~GradSync();
  GradSync(const GradSync&) = delete;
  GradSync& operator=(const GradSync&) = delete;

  // Gradient accumulation: with false, backward passes leave gradients local (hooks do
  // nothing); set true before the last micro-batch's backward, then finish().
  void set_enabled(bool enabled) { enabled_ = enabled; }
  // Collective, after backward: every p.grad() becomes the mean over ranks (identical on every
  // rank). A parameter without a gradient on every rank keeps none; on some ranks only, it
  // counts as zero where missing.
  void finish();

  int num_buckets() const { return static_cast<int>(buckets_.size()); }
  int64_t buckets_issued_during_backward() const { return issued_early_; }

 private:
  struct Bucket {
    std::vector<size_t> params;  // indices into params_
    std::vector<int64_t> offsets;
    at::Tensor flat;
    int ready = 0;
    bool issued = false, dirty = false;
    std::unique_ptr<Work> work;
  };
  struct Hook;

  Communicator& comm_;
  std::vector<at::Tensor> params_;
  std::vector<int> bucket_of_;  // per param
  std::vector<bool> seen_;      // per param: hook fired in this backward
  std::vector<Bucket> buckets_;
  int next_to_issue_ = 0;
  bool enabled_ = true;
  bool overlap_ = true;
  int64_t issued_early_ = 0;

  void on_grad_ready(size_t param);
  void issue(Bucket& b);
  void issue_ready_in_order();
  void reset_pass();
};

// Clipping: after GradSync::finish() the gradients are identical on every rank, so the
// replicated optimizer (src/train/optimizer.h) clips with the global norm. The sharded
// optimizer (src/train/sharded_adamw.cpp) uses the collectives directly, not GradSync.

}  // namespace fluxtrain::dist
