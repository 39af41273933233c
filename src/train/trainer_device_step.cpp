// The trainer's single-process step (issue 15): the update runs on the device, so an update
// costs one host synchronisation (reading loss, norm and skip at its end) instead of one per
// shape group plus the norm, and every piece can be replayed as a CUDA graph
// (train/step_graphs.h):
//   micro-step  forward + flow-matching loss + backward, accumulating into the LoRA gradients
//               (kept allocated between updates, zeroed by the update) and into the update's loss;
//   update      PyTorch's clip_grad_norm_ + fused AdamW (Optimizer::step_on_device), skipped on
//               the device when the loss or the norm is not finite; then gradients zeroed.
// Eager and graph replay run the same functions on the same tensors, so on the same device
// they give bit-identical results. The host update (trainer.cpp, train_step_on) remains for
// runs whose step holds collectives (mpirun, sharded optimizer, --encoder_process).
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <sstream>

#include <ATen/ATen.h>

#include "core/error.h"
#include "train/block_major_step.h"
#include "train/step_graphs.h"
#include "train/train_step.h"
#include "train/trainer.h"

namespace fluxtrain {
namespace {

// Micro-step shapes captured at most; further shapes (rare buckets) run eagerly. Graphs share
// one memory pool, so more shapes cost little memory, but each capture takes a second or two.
constexpr size_t kMaxGraphShapes = 8;

// FLUXTRAIN_STEP_TIMING=1: one line per update with where the host's time went (finding the
// per-update cost that separates `train` from `bench`, docs/benchmarks.md).
struct HostTiming {
  using Clock = std::chrono::steady_clock;
  bool on = std::getenv("FLUXTRAIN_STEP_TIMING") != nullptr;
  Clock::time_point last_end{};
  double prep_ms = 0;  // this update's input preparation (group_inputs: noise, packing, copies)
  static double ms(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  }
};
HostTiming& host_timing() {
  static HostTiming t;
  return t;
}

std::string inputs_key(const FluxInputs& in, const at::Tensor& target) {
  std::ostringstream ss;
  ss << in.img.sizes() << in.txt.sizes() << in.y.sizes() << target.sizes();
  for (const auto& c : in.cond) ss << c.sizes();
  return ss.str();
}

// Static copies of a micro-step's inputs: allocated once, refilled before every run.
void copy_inputs(FluxInputs& dst, const FluxInputs& src) {
  dst.img.copy_(src.img);
  dst.img_ids.copy_(src.img_ids);
  dst.txt.copy_(src.txt);
  dst.txt_ids.copy_(src.txt_ids);
  dst.y.copy_(src.y);
  dst.timesteps.copy_(src.timesteps);
  dst.guidance.copy_(src.guidance);
  for (size_t k = 0; k < src.cond.size(); ++k) {
    dst.cond[k].copy_(src.cond[k]);
    dst.cond_ids[k].copy_(src.cond_ids[k]);
  }
}

FluxInputs clone_inputs(const FluxInputs& src) {
  auto c = [](const at::Tensor& t) { return t.defined() ? t.detach().clone() : t; };
  FluxInputs d;
  d.img = c(src.img);
  d.img_ids = c(src.img_ids);
  d.txt = c(src.txt);
  d.txt_ids = c(src.txt_ids);
  d.y = c(src.y);
  d.timesteps = c(src.timesteps);
  d.guidance = c(src.guidance);
  for (size_t k = 0; k < src.cond.size(); ++k) {
    d.cond.push_back(c(src.cond[k]));
    d.cond_ids.push_back(c(src.cond_ids[k]));
  }
  return d;
}

}  // namespace

void Trainer::setup_step_mode() {
  // The device update needs every gradient in this process: no collective in the step.
  if (!optimizer_->has_device_step() || rt_.ctl_comm || opt_.world_size > 1) {
    step_mode_ = "host update";
    if (cfg_.train.cuda_graph == "on")
      throw Error("--cuda_graph on: the step holds collectives (mpirun, --shard_weights, --shard_optimizer or "
                  "--encoder_process); use --cuda_graph auto or off");
    return;
  }
  if (cfg_.train.block_major_accumulation && cfg_.train.gradient_accumulation_steps > 1) {
    // Block-major runs all micro-batches through each block at once (train/block_major_step.h),
    // with the host update after them.
    step_mode_ = "host update (--block_major_accumulation)";
    if (cfg_.train.cuda_graph == "on")
      throw Error("--cuda_graph on: --block_major_accumulation runs its micro-batches eagerly; use --cuda_graph auto or off");
    return;
  }
  device_step_ = std::make_unique<DeviceStepState>();
  const at::ScalarType master = all_params_.empty() ? at::kFloat : all_params_[0].scalar_type();
  const auto on = at::TensorOptions().device(rt_.device);
  // The fused AdamW reads a float32 rate on CUDA; float64 parameters (exactness tests) keep float64.
  device_step_->lr = at::zeros({}, on.dtype(master == at::kDouble ? at::kDouble : at::kFloat));
  device_step_->skip = at::zeros({}, on.dtype(at::kFloat));
  device_step_->loss = at::zeros({}, on.dtype(at::kDouble));
  device_step_->stats = at::zeros({3}, on.dtype(at::kDouble));

  std::string why;
  if (cfg_.train.cuda_graph == "off") why = "--cuda_graph off";
  else if (!rt_.device.is_cuda()) why = "not a CUDA device";
  else if (cfg_.low_memory.streams())
    why = "streamed blocks (--blocks_to_swap / --max_gpu_memory) are scheduled by the host";
  else if (online_.trains_text_encoder) why = "the text-encoder LoRA trains inside the step";
  if (why.empty()) {
    graphs_ = make_step_graphs(rt_.device);
    if (!graphs_) why = "this build has no CUDA";
  }
  if (!why.empty() && cfg_.train.cuda_graph == "on") throw Error("--cuda_graph on: " + why);
  step_mode_ = why.empty() ? "device update, CUDA graphs" : "device update, eager (" + why + ")";
}

void Trainer::run_piece(const std::string& key, const std::function<void()>& fn) {
  if (!graphs_) {
    fn();
    return;
  }
  // A replay rewrites the providers' block buffers (fp8 dequantisation slots) behind their
  // bookkeeping: captures start from empty buffers, and eager users after a replay refill them.
  if (!graphs_->captured(key)) weights_->forget_cached_blocks();
  try {
    graphs_->run(key, fn);
  } catch (const Error& e) {
    // Nothing ran during the failed capture: the piece runs eagerly, and so does the rest of the run.
    graphs_.reset();
    step_mode_ = std::string("device update, eager (") + e.what() + ")";
    if (is_root()) std::fprintf(opt_.log, "fluxtrain train: %s; continuing without CUDA graphs\n", e.what());
    weights_->forget_cached_blocks();
    fn();
    return;
  }
  weights_->forget_cached_blocks();
}

void Trainer::micro_step_device(const Batch& batch, double grad_scale) {
  std::vector<Sample> samples = batch.samples;  // latents are filled in here for image datasets
  begin_online(samples, true);
  const std::vector<std::vector<const Sample*>> groups = shape_groups(samples);
  const double scale = grad_scale / static_cast<double>(samples.size());
  const bool ckpt = cfg_.model.gradient_checkpointing;
  DeviceStepState& st = *device_step_;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& g = groups[gi];
    DeviceStepState::Group fresh;
    const auto t_prep = HostTiming::Clock::now();
    fresh.in = group_inputs(g, static_cast<uint64_t>(batch.epoch), false, &fresh.target, prepared_inputs(batch, gi));
    if (host_timing().on) host_timing().prep_ms += HostTiming::ms(t_prep, HostTiming::Clock::now());
    fresh.scale = at::full({}, scale, at::TensorOptions().device(rt_.device).dtype(at::kDouble));
    DeviceStepState::Group* use = &fresh;
    std::string key;
    if (graphs_) {
      key = "micro-step " + inputs_key(fresh.in, fresh.target);
      auto it = st.groups.find(key);
      if (it == st.groups.end() && st.groups.size() < kMaxGraphShapes) {
        auto made = std::make_unique<DeviceStepState::Group>();
        made->in = clone_inputs(fresh.in);
        made->target = fresh.target.clone();
        made->scale = fresh.scale.clone();
        it = st.groups.emplace(key, std::move(made)).first;
      } else if (it != st.groups.end()) {
        copy_inputs(it->second->in, fresh.in);
        it->second->target.copy_(fresh.target);
        it->second->scale.copy_(fresh.scale);
      }
      if (it != st.groups.end()) use = it->second.get();
      else key.clear();  // beyond the shapes captured: eager
    }
    auto body = [this, use, ckpt, &st] {
      const at::Tensor sum = flow_loss_sum(model_cfg_, *weights_, &lora_, use->in, use->target, ckpt);
      st.loss.add_(sum.detach().to(at::kDouble) * use->scale);
      (sum * use->scale).backward();
    };
    if (key.empty()) body();
    else run_piece(key, body);
  }
  end_online();
}

StepResult Trainer::train_step_device(const std::vector<Batch>& micro_batches) {
  HostTiming& ht = host_timing();
  const auto t_begin = HostTiming::Clock::now();
  DeviceStepState& st = *device_step_;
  StepResult r;
  r.lr = schedule_.lr(state_.step);
  // Gradients stay allocated from update to update: backward adds into them in place (what a
  // captured backward needs), and the update zeroes them.
  std::vector<at::Tensor> grads;
  for (auto& p : all_params_) {
    if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p, p.options().requires_grad(false));
    grads.push_back(p.grad());
  }
  st.lr.fill_(r.lr);
  // Test hook (as in the host update): this rank's update at step K counts as non-finite.
  const bool forced = cfg_.debug.nan_at_step == state_.step && cfg_.debug.nan_rank == opt_.rank &&
                      state_.nonfinite_total == 0;
  st.skip.fill_(forced ? 1.0 : 0.0);
  const double accum = static_cast<double>(micro_batches.size());
  for (const auto& mb : micro_batches) micro_step_device(mb, 1.0 / accum);

  const double max_norm = cfg_.train.max_grad_norm;
  run_piece("update", [this, &st, grads, max_norm] {
    const at::Tensor bad = at::logical_or(st.skip != 0, at::logical_not(at::isfinite(st.loss)));
    const Optimizer::DeviceStep d = optimizer_->step_on_device(st.lr, max_norm, bad);
    st.stats.copy_(at::stack({st.loss, d.norm.to(at::kDouble), d.applied.to(at::kDouble)}));
    at::_foreach_zero_(grads);
    st.loss.zero_();
  });
  const auto t_launched = HostTiming::Clock::now();
  const at::Tensor stats = st.stats.cpu();  // the update's one synchronisation
  if (ht.on) {
    const auto t_end = HostTiming::Clock::now();
    std::fprintf(opt_.log,
                 "step timing: outside the step %.2f ms, micro-steps and update issued %.2f ms (inputs prepared "
                 "%.2f ms), wait %.2f ms\n",
                 ht.last_end == HostTiming::Clock::time_point{} ? 0.0 : HostTiming::ms(ht.last_end, t_begin),
                 HostTiming::ms(t_begin, t_launched), ht.prep_ms, HostTiming::ms(t_launched, t_end));
    ht.last_end = t_end;
    ht.prep_ms = 0;
  }
  const double* v = stats.data_ptr<double>();
  const bool applied = v[2] > 0.5;
  optimizer_->count_device_step(applied);
  r.loss = std::isfinite(v[0]) && !forced ? v[0] : std::numeric_limits<double>::quiet_NaN();
  r.grad_norm = std::isfinite(r.loss) ? v[1] : std::numeric_limits<double>::quiet_NaN();
  if (!applied) {
    r.skipped = true;
    ++state_.nonfinite_in_a_row;
    ++state_.nonfinite_total;
    if (state_.nonfinite_in_a_row >= cfg_.train.max_nonfinite_steps)
      throw Error("stopping: " + std::to_string(state_.nonfinite_in_a_row) +
                  " updates in a row had a non-finite loss or gradient (--max_nonfinite_steps " +
                  std::to_string(cfg_.train.max_nonfinite_steps) + "; lower --learning_rate or check the data)");
    return r;
  }
  state_.optimizer_steps = optimizer_->steps();
  state_.nonfinite_in_a_row = 0;
  state_.lr = r.lr;
  ++state_.step;
  return r;
}

}  // namespace fluxtrain
