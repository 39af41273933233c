// --shard_optimizer: AdamW whose state is split over the ranks (ZeRO-1 style). The LoRA
// parameters are laid out as one flat vector, padded to a multiple of 64 x ranks; rank r owns
// elements [r*S, (r+1)*S). A step reduce-scatters the gradients (the mean over ranks), clips by
// the global norm (the slices partition the gradient, so the sum of their squares is the whole
// sum), runs the same adamw_update as the replicated optimizer on this rank's slice, and
// all-gathers the parameters. The collectives are dist::Communicator's; the math is here.
#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "core/error.h"
#include "dist/communicator.h"
#include "train/optimizer.h"

namespace fluxtrain {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

class ShardedAdamW final : public Optimizer {
 public:
  ShardedAdamW(dist::Communicator& comm, std::vector<ParamGroup> groups, const AdamWConfig& cfg)
      : comm_(comm), groups_(std::move(groups)), cfg_(cfg) {
    params_ = all_params(groups_);
    check_input(!params_.empty(), "sharded AdamW: no parameters");
    for (const auto& g : groups_)
      for (size_t k = 0; k < g.params.size(); ++k) lr_scale_.push_back(g.lr_scale);
    for (const auto& p : params_) {
      check_input(p.defined() && p.is_leaf() && p.requires_grad(), "sharded AdamW: parameters must be leaves");
      check_input(p.scalar_type() == params_[0].scalar_type() && p.device() == params_[0].device(),
                  "sharded AdamW: all parameters must share one dtype and device");
      offsets_.push_back(total_);
      total_ += p.numel();
    }
    // 64-element units keep every rank's slice aligned for the device collectives.
    padded_ = round_up(std::max<int64_t>(total_, 1), comm_.size() * 64);
    shard_ = padded_ / comm_.size();
    exp_avg_ = at::zeros({shard_}, params_[0].options().requires_grad(false));
    exp_avg_sq_ = at::zeros({shard_}, params_[0].options().requires_grad(false));
    step_t_ = at::zeros({}, exp_avg_.options().dtype(at::kFloat));
  }

  double step(double lr, double max_grad_norm, double extra_sq_norm = 0) override {
    at::NoGradGuard no_grad;
    const size_t P = params_.size();
    // Which parameters have a gradient on some rank: the others are left alone (no decay, no
    // moment update), as torch::optim::AdamW skips parameters without grad.
    at::Tensor has = at::zeros({static_cast<int64_t>(P)}, at::kLong);
    for (size_t i = 0; i < P; ++i) has.data_ptr<int64_t>()[i] = params_[i].grad().defined() ? 1 : 0;
    comm_.all_reduce(has, dist::ReduceOp::Max);
    const int64_t* active = has.data_ptr<int64_t>();

    at::Tensor flat_grad = at::zeros({padded_}, params_[0].options().requires_grad(false));
    for (size_t i = 0; i < P; ++i)
      if (params_[i].grad().defined())
        flat_grad.narrow(0, offsets_[i], params_[i].numel()).copy_(params_[i].grad().reshape({-1}));
    at::Tensor g = at::empty({shard_}, flat_grad.options());
    comm_.reduce_scatter(g, flat_grad, dist::ReduceOp::Avg);

    at::Tensor sq = g.to(at::kDouble).pow(2).sum().reshape({1});
    comm_.all_reduce(sq, dist::ReduceOp::Sum);
    const double norm = std::sqrt(sq.item<double>() + extra_sq_norm);
    if (!std::isfinite(norm)) return norm;  // the same on every rank: all skip this update
    const double coef = clip_coefficient(norm, max_grad_norm);
    if (coef < 1.0) g.mul_(coef);

    ++steps_;
    step_t_.fill_(static_cast<double>(steps_));
    at::Tensor p = shard_of_params();
    // Runs of consecutive active parameters with one learning rate, clipped to this rank's
    // slice: one update each (usually a single run: the whole slice).
    const int64_t lo = comm_.rank() * shard_, hi = lo + shard_;
    size_t i = 0;
    while (i < P) {
      if (!active[i]) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j + 1 < P && active[j + 1] && lr_scale_[j + 1] == lr_scale_[i]) ++j;
      const int64_t a = std::max(lo, offsets_[i]), z = std::min(hi, offsets_[j] + params_[j].numel());
      if (a < z) {
        adamw_update({p.narrow(0, a - lo, z - a)}, {g.narrow(0, a - lo, z - a)}, {exp_avg_.narrow(0, a - lo, z - a)},
                     {exp_avg_sq_.narrow(0, a - lo, z - a)}, step_t_, lr * lr_scale_[i], cfg_);
      }
      i = j + 1;
    }
    at::Tensor full = gather_full(p);
    for (size_t k = 0; k < P; ++k)
      params_[k].detach().copy_(full.narrow(0, offsets_[k], params_[k].numel()).view(params_[k].sizes()));
    return norm;
  }

  int64_t steps() const override { return steps_; }

  TensorMap state() override {
    TensorMap out;
    at::Tensor m = gather_full(exp_avg_), v = gather_full(exp_avg_sq_);
    for (size_t i = 0; i < params_.size(); ++i) {
      const std::string k = std::to_string(i);
      out["exp_avg." + k] = m.narrow(0, offsets_[i], params_[i].numel()).view(params_[i].sizes()).clone();
      out["exp_avg_sq." + k] = v.narrow(0, offsets_[i], params_[i].numel()).view(params_[i].sizes()).clone();
    }
    return out;
  }

  void load_state(const TensorMap& state, int64_t steps, const std::string& file) override {
    check_input(state.size() == 2 * params_.size(),
                file + ": optimizer state has " + std::to_string(state.size() / 2) + " parameters, expected " +
                    std::to_string(params_.size()));
    at::Tensor m = at::zeros({padded_}, exp_avg_.options()), v = at::zeros({padded_}, exp_avg_.options());
    for (size_t i = 0; i < params_.size(); ++i) {
      for (const std::string kind : {"exp_avg.", "exp_avg_sq."}) {
        const std::string key = kind + std::to_string(i);
        auto it = state.find(key);
        check_input(it != state.end(), file + ": optimizer state lacks " + key);
        check_input(it->second.sizes() == params_[i].sizes(), file + ": optimizer state " + key + " has the wrong shape");
        (kind == "exp_avg." ? m : v).narrow(0, offsets_[i], params_[i].numel()).copy_(it->second.reshape({-1}));
      }
    }
    steps_ = steps;
    const int64_t begin = comm_.rank() * shard_;
    exp_avg_ = m.narrow(0, begin, shard_).clone();
    exp_avg_sq_ = v.narrow(0, begin, shard_).clone();
  }

  int64_t state_bytes() const override { return 2 * shard_ * exp_avg_.element_size(); }

 private:
  dist::Communicator& comm_;
  std::vector<ParamGroup> groups_;
  AdamWConfig cfg_;
  std::vector<at::Tensor> params_;
  std::vector<double> lr_scale_;  // per parameter
  std::vector<int64_t> offsets_;
  int64_t total_ = 0, padded_ = 0, shard_ = 0, steps_ = 0;
  at::Tensor exp_avg_, exp_avg_sq_;  // this rank's slice
  at::Tensor step_t_;                // t on the device, read by the fused update

  // This rank's slice of the flat parameters (zeros in the padding).
  at::Tensor shard_of_params() const {
    const int64_t lo = comm_.rank() * shard_, hi = lo + shard_;
    at::Tensor out = at::zeros({shard_}, params_[0].options().requires_grad(false));
    for (size_t i = 0; i < params_.size(); ++i) {
      const int64_t a = std::max(lo, offsets_[i]), z = std::min(hi, offsets_[i] + params_[i].numel());
      if (a < z)
        out.narrow(0, a - lo, z - a).copy_(params_[i].detach().reshape({-1}).narrow(0, a - offsets_[i], z - a));
    }
    return out;
  }

  at::Tensor gather_full(const at::Tensor& shard) {
    at::Tensor full = at::empty({padded_}, shard.options());
    comm_.all_gather(full, shard.contiguous());
    return full;
  }
};

}  // namespace

std::unique_ptr<Optimizer> make_sharded_adamw(dist::Communicator& comm, std::vector<ParamGroup> groups,
                                              const AdamWConfig& cfg) {
  return std::make_unique<ShardedAdamW>(comm, std::move(groups), cfg);
}

}  // namespace fluxtrain
