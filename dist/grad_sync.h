// Gradients of replicated trainable parameters (LoRA) across data-parallel ranks.
//
// GradSync (replicated optimizer): gradients are averaged over ranks in buckets. With overlap,
// a post-accumulate-grad hook on each parameter marks it ready during backward, and a bucket's
// all-reduce is issued as soon as all its parameters are ready and every earlier bucket has
// been issued, so communication runs while backward continues. Buckets are always issued in
// the same order on every rank, whatever order the hooks fire in; finish() issues what is left,
// waits, and writes the averages back into p.grad().
//
// ShardedAdamW (--shard_optimizer): the gradients are reduce-scattered instead (each rank gets
// the average of its 1/N slice of the flattened parameters), clipped by the global norm, the
// rank's slice is updated with AdamW whose state exists only for that slice, and the updated
// parameters are all-gathered. Its state() is the full, unsharded state, so a checkpoint
// written with N ranks resumes on M ranks.
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
// trainer's clip_grad_norm (src/train/optimizer.h) on the local gradients uses the global norm.
// ShardedAdamW clips inside step(), from the norm of all ranks' slices.

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 1e-2;
};

class ShardedAdamW {
 public:
  // params: one floating dtype and device. Collective (every rank, same shapes).
  ShardedAdamW(Communicator& comm, std::vector<at::Tensor> params, const AdamWOptions& opt = {});
  // Collective: averages the local gradients over ranks (reduce-scatter), clips by the global
  // norm (max_grad_norm <= 0: no clipping), applies AdamW with learning rate lr to this rank's
  // slice and all-gathers the parameters. The update is the trainer's AdamW
  // (src/train/optimizer.h: decoupled weight decay, one step count t for the bias corrections,
  // the operations of torch::optim::AdamW). A parameter with a gradient on some ranks counts as
  // zero on the others; one without a gradient on any rank is left alone, moments included.
  // Returns the global gradient norm before clipping; when it is not finite, nothing is
  // updated (parameters, moments and t stay as they were) and the caller skips the step.
  double step(double lr, double max_grad_norm = 0.0);

  int64_t steps() const { return step_; }  // t, as AdamW::steps()
  // Full state, gathered on every rank, in the trainer's AdamW::state() format:
  // "exp_avg.<i>", "exp_avg_sq.<i>" shaped like parameter i. Collective.
  TensorMap state();
  // Restores a state written by state() or AdamW::state() (with any number of ranks), and t.
  void load_state(const TensorMap& state, int64_t steps);
  // Bytes of optimizer state held by this rank (2 moments of its slice).
  int64_t state_bytes() const;

 private:
  Communicator& comm_;
  std::vector<at::Tensor> params_;
  AdamWOptions opt_;
  std::vector<int64_t> offsets_;
  int64_t total_ = 0, padded_ = 0, shard_ = 0;
  at::Tensor exp_avg_, exp_avg_sq_;  // this rank's slice
  int64_t step_ = 0;

  at::Tensor shard_of_params() const;
  at::Tensor gather_full(const at::Tensor& shard);
};

}  // namespace fluxtrain::dist
