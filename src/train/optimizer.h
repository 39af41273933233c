// The optimizer of the LoRA weights: AdamW on float32 master weights (PyTorch's
// torch.optim.AdamW semantics, amsgrad off)
//   p <- p * (1 - lr * wd)
//   m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
//   p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// after clipping by the global L2 norm over every group (torch.nn.utils.clip_grad_norm_: scale
// by max_norm / (norm + 1e-6) when that is below 1).
//
// One interface, two implementations: replicated (every rank holds the whole state; gradients
// already averaged by dist::GradSync) and sharded (--shard_optimizer: train/sharded_adamw.cpp,
// each rank 1/N of the state). Both run the same update (adamw_update) and the same clipping
// coefficient (clip_coefficient). Parameter groups carry their own learning-rate factor (the
// text encoders' LoRA trains at --text_encoder_lr beside the transformer's --learning_rate).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"

namespace fluxtrain {

namespace dist {
class Communicator;
}

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 1e-4;
};

struct ParamGroup {
  std::string name;               // "transformer", "text_encoder", ...
  std::vector<at::Tensor> params;  // requires_grad leaves, one dtype and device per optimizer
  double lr_scale = 1.0;          // this group's lr = the schedule's lr x lr_scale
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // Clips the gradients (max_grad_norm <= 0: no clipping) and applies AdamW with learning rate
  // lr x each group's lr_scale. Returns the global gradient norm before clipping; when it is
  // not finite nothing is changed (the caller skips the update). Parameters without a gradient
  // are left alone, their moments too. Collective for the sharded optimizer.
  // extra_sq_norm: the squared norm of gradients this optimizer does not hold (the text-encoder
  // LoRA on the encoder process, train/encoder_process.h), the same on every rank; the norm that
  // clips and that is returned is sqrt(own + extra), so that every group gets one coefficient.
  virtual double step(double lr, double max_grad_norm, double extra_sq_norm = 0) = 0;
  virtual int64_t steps() const = 0;
  // "exp_avg.<i>", "exp_avg_sq.<i>" for parameter i over all groups in order. The same format
  // for both implementations, so that a run can resume with or without --shard_optimizer.
  // Collective for the sharded optimizer.
  virtual TensorMap state() = 0;
  virtual void load_state(const TensorMap& state, int64_t steps, const std::string& file) = 0;
  // Bytes of optimizer state this process holds.
  virtual int64_t state_bytes() const = 0;
  // The same update without host synchronisation (the trainer's single-process path, eager or
  // captured in a CUDA graph; train/step_graphs.h). PyTorch's clip_grad_norm_ formula on the
  // device: norm = |(|g_1|, ..., |g_n|)| in the gradients' dtype, coefficient
  // min(1, max_norm / (norm + 1e-6)). lr: 0-dim tensor on the parameters' device (float32, or
  // float64 for float64 parameters) holding the schedule's rate; each group multiplies its
  // lr_scale. skip: 0-dim tensor, non-zero = leave everything unchanged (a non-finite loss);
  // a non-finite norm does the same. Every parameter must have a gradient. Returns the norm
  // before clipping and whether the update was applied (1) or skipped (0), as 0-dim tensors
  // of this call. The device-side step count advances only when applied; tell the host with
  // count_device_step so that steps() and the checkpoint agree.
  virtual bool has_device_step() const { return false; }
  struct DeviceStep {
    at::Tensor norm, applied;
  };
  virtual DeviceStep step_on_device(const at::Tensor& lr, double max_grad_norm, const at::Tensor& skip);
  virtual void count_device_step(bool applied);
};

// Every rank the whole state.
std::unique_ptr<Optimizer> make_adamw(std::vector<ParamGroup> groups, const AdamWConfig& cfg);
// Each rank 1/N of the state: gradients reduce-scattered (averaged over ranks), the update on
// this rank's slice, parameters all-gathered (train/sharded_adamw.cpp).
std::unique_ptr<Optimizer> make_sharded_adamw(dist::Communicator& comm, std::vector<ParamGroup> groups,
                                              const AdamWConfig& cfg);

// The AdamW update of tensors p (parameters or flat slices) in place, with their moments m, v,
// at step t held in the 0-dim float32 tensor `step` (bias corrections 1 - b^t), one fused kernel
// (PyTorch's _fused_adamw_, the operations of torch.optim.AdamW(fused=True)). found_inf (0-dim,
// optional): when non-zero the update is a no-op.
void adamw_update(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g, const std::vector<at::Tensor>& m,
                  const std::vector<at::Tensor>& v, const at::Tensor& step, double lr, const AdamWConfig& cfg,
                  const at::Tensor& found_inf = {});
// The same with the learning rate in a 0-dim tensor on the parameters' device (capturable).
void adamw_update(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g, const std::vector<at::Tensor>& m,
                  const std::vector<at::Tensor>& v, const at::Tensor& step, const at::Tensor& lr, const AdamWConfig& cfg,
                  const at::Tensor& found_inf = {});
// max_norm / (norm + 1e-6) when that is below 1, else 1 (also for max_norm <= 0).
double clip_coefficient(double norm, double max_norm);

// Global L2 norm of the gradients (each parameter's norm in its gradient's dtype, the sum over
// parameters in float64); NaN/inf if any gradient is non-finite.
double grad_global_norm(const std::vector<at::Tensor>& params);
// Scales gradients so that their global norm is at most max_norm; returns the norm before.
// A non-finite norm leaves the gradients untouched (the caller skips the update).
// extra_sq_norm: squared norm of gradients held elsewhere, counted in the norm.
double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, double extra_sq_norm = 0);
// Sum of squares of the gradients (as grad_global_norm), for extra_sq_norm.
double grad_sq_norm(const std::vector<at::Tensor>& params);

// The parameters of all groups, in order.
std::vector<at::Tensor> all_params(const std::vector<ParamGroup>& groups);

}  // namespace fluxtrain
