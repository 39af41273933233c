#include "dist/grad_sync.h"

#include <cmath>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "core/error.h"
#include "dist/communicator.h"

namespace fluxtrain::dist {

namespace {

void check_params(const std::vector<at::Tensor>& params, const char* who) {
  for (size_t i = 0; i < params.size(); ++i) {
    check_input(params[i].defined(), std::string(who) + ": parameter " + std::to_string(i) + " is undefined");
    check_input(at::isFloatingType(params[i].scalar_type()),
                std::string(who) + ": parameter " + std::to_string(i) + " is not floating point");
  }
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// GradSync

struct GradSync::Hook : public torch::autograd::PostAccumulateGradHook {
  GradSync* owner;
  size_t index;
  Hook(GradSync* o, size_t i) : owner(o), index(i) {}
  void operator()(const at::Tensor&) override { owner->on_grad_ready(index); }
};

GradSync::GradSync(Communicator& comm, std::vector<at::Tensor> params, const GradSyncOptions& opt)
    : comm_(comm), params_(std::move(params)), overlap_(opt.overlap) {
  check_params(params_, "gradient sync");
  bucket_of_.assign(params_.size(), -1);
  seen_.assign(params_.size(), false);
  // Reverse order: parameters of late blocks get their gradients first in backward, so
  // buckets fill (and can be issued) in bucket order.
  int64_t bytes = 0;
  for (size_t k = params_.size(); k-- > 0;) {
    const at::Tensor& p = params_[k];
    const int64_t nb = p.numel() * p.element_size();
    bool fresh = buckets_.empty() || bytes + nb > opt.bucket_bytes;
    if (!fresh) {
      const at::Tensor& first = params_[buckets_.back().params.front()];
      fresh = first.scalar_type() != p.scalar_type() || first.device() != p.device();
    }
    if (fresh) {
      buckets_.emplace_back();
      bytes = 0;
    }
    Bucket& b = buckets_.back();
    b.offsets.push_back(b.params.empty() ? 0 : b.offsets.back() + params_[b.params.back()].numel());
    b.params.push_back(k);
    bucket_of_[k] = static_cast<int>(buckets_.size()) - 1;
    bytes += nb;
  }
  for (Bucket& b : buckets_) {
    const at::Tensor& last = params_[b.params.back()];
    b.flat = at::zeros({b.offsets.back() + last.numel()}, last.options().requires_grad(false));
  }
  if (overlap_)
    for (size_t k = 0; k < params_.size(); ++k)
      torch::autograd::impl::set_post_acc_grad_hooks(params_[k], std::make_unique<Hook>(this, k));
}

GradSync::~GradSync() {
  if (overlap_)
    for (auto& p : params_) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  for (Bucket& b : buckets_)
    if (b.work) {
      try {
        b.work->wait();
      } catch (...) {
      }
    }
}

void GradSync::on_grad_ready(size_t k) {
  if (!enabled_) return;
  Bucket& b = buckets_[bucket_of_[k]];
  if (seen_[k]) {
    // Accumulated again in the same pass (several backward calls before finish): an issued
    // bucket carries a stale copy and is redone in finish().
    if (b.issued) b.dirty = true;
    return;
  }
  seen_[k] = true;
  ++b.ready;
  issue_ready_in_order();
}

void GradSync::issue(Bucket& b) {
  at::NoGradGuard no_grad;
  for (size_t j = 0; j < b.params.size(); ++j) {
    const at::Tensor& p = params_[b.params[j]];
    at::Tensor slice = b.flat.narrow(0, b.offsets[j], p.numel());
    const at::Tensor& g = p.grad();
    if (g.defined()) slice.copy_(g.reshape({-1}));
    else slice.zero_();
  }
  b.work = comm_.all_reduce_async(b.flat, ReduceOp::Avg);
  b.issued = true;
}

void GradSync::issue_ready_in_order() {
  // Strictly in bucket order, so that every rank issues the same sequence of collectives
  // whatever order its hooks fired in.
  while (next_to_issue_ < static_cast<int>(buckets_.size())) {
    Bucket& b = buckets_[next_to_issue_];
    if (b.ready != static_cast<int>(b.params.size())) break;
    issue(b);
    ++issued_early_;
    ++next_to_issue_;
  }
}

void GradSync::finish() {
  if (!enabled_) return;
  // 1. Everything not issued yet, in order (gradients are final now).
  while (next_to_issue_ < static_cast<int>(buckets_.size())) issue(buckets_[next_to_issue_++]);
  // 2. Agree on which parameters have a gradient anywhere and which buckets must be redone;
  //    after step 1, so that this collective has the same place in every rank's sequence.
  const int64_t P = static_cast<int64_t>(params_.size()), B = static_cast<int64_t>(buckets_.size());
  at::Tensor flags = at::zeros({P + B}, at::kLong);
  auto* f = flags.data_ptr<int64_t>();
  for (int64_t k = 0; k < P; ++k) f[k] = params_[k].grad().defined() ? 1 : 0;
  for (int64_t b = 0; b < B; ++b) f[P + b] = buckets_[b].dirty ? 1 : 0;
  comm_.all_reduce(flags, ReduceOp::Max);
  for (int64_t b = 0; b < B; ++b)
    if (f[P + b]) {
      buckets_[b].work->wait();
      issue(buckets_[b]);
    }
  // 3. Write the averages back.
  at::NoGradGuard no_grad;
  for (int64_t b = 0; b < B; ++b) {
    Bucket& bk = buckets_[b];
    bk.work->wait();
    for (size_t j = 0; j < bk.params.size(); ++j) {
      at::Tensor& p = params_[bk.params[j]];
      if (!f[bk.params[j]]) continue;  // no gradient on any rank
      at::Tensor avg = bk.flat.narrow(0, bk.offsets[j], p.numel()).view(p.sizes());
      if (p.grad().defined()) p.mutable_grad().copy_(avg);
      else p.mutable_grad() = avg.clone();
    }
  }
  reset_pass();
}

void GradSync::reset_pass() {
  std::fill(seen_.begin(), seen_.end(), false);
  for (Bucket& b : buckets_) {
    b.ready = 0;
    b.issued = b.dirty = false;
    b.work.reset();
  }
  next_to_issue_ = 0;
}

// ---------------------------------------------------------------------------------------------
// ShardedAdamW

ShardedAdamW::ShardedAdamW(Communicator& comm, std::vector<at::Tensor> params, const AdamWOptions& opt)
    : comm_(comm), params_(std::move(params)), opt_(opt) {
  check_params(params_, "sharded AdamW");
  check_input(!params_.empty(), "sharded AdamW: no parameters");
  for (const auto& p : params_)
    check_input(p.scalar_type() == params_[0].scalar_type() && p.device() == params_[0].device(),
                "sharded AdamW: all parameters must share one dtype and device");
  for (const auto& p : params_) {
    offsets_.push_back(total_);
    total_ += p.numel();
  }
  // 64-element units keep every rank's slice aligned for the device collectives.
  padded_ = round_up(std::max<int64_t>(total_, 1), comm_.size() * 64);
  shard_ = padded_ / comm_.size();
  exp_avg_ = at::zeros({shard_}, params_[0].options().requires_grad(false));
  exp_avg_sq_ = at::zeros({shard_}, params_[0].options().requires_grad(false));
}

at::Tensor ShardedAdamW::shard_of_params() const {
  // Only the parts of the parameters that fall into this rank's slice (the rest is padding).
  const int64_t lo = comm_.rank() * shard_, hi = lo + shard_;
  at::Tensor out = at::zeros({shard_}, params_[0].options().requires_grad(false));
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t a = std::max(lo, offsets_[i]), z = std::min(hi, offsets_[i] + params_[i].numel());
    if (a < z) out.narrow(0, a - lo, z - a).copy_(params_[i].detach().reshape({-1}).narrow(0, a - offsets_[i], z - a));
  }
  return out;
}

at::Tensor ShardedAdamW::gather_full(const at::Tensor& shard) {
  at::Tensor full = at::empty({padded_}, shard.options());
  comm_.all_gather(full, shard);
  return full;
}

double ShardedAdamW::step(double lr, double max_grad_norm) {
  at::NoGradGuard no_grad;
  const size_t P = params_.size();
  // Which parameters have a gradient on some rank: the others are left alone (no decay, no
  // moment update, no step count), as torch::optim::AdamW skips parameters without grad.
  at::Tensor has = at::zeros({static_cast<int64_t>(P)}, at::kLong);
  for (size_t i = 0; i < P; ++i) has.data_ptr<int64_t>()[i] = params_[i].grad().defined() ? 1 : 0;
  comm_.all_reduce(has, ReduceOp::Max);
  const int64_t* active = has.data_ptr<int64_t>();

  at::Tensor flat_grad = at::zeros({padded_}, params_[0].options().requires_grad(false));
  for (size_t i = 0; i < P; ++i)
    if (params_[i].grad().defined())
      flat_grad.narrow(0, offsets_[i], params_[i].numel()).copy_(params_[i].grad().reshape({-1}));
  at::Tensor g = at::empty({shard_}, flat_grad.options());
  comm_.reduce_scatter(g, flat_grad, ReduceOp::Avg);

  // Global norm: the slices partition the averaged gradient, so the sum of their squares is
  // the full sum. Accumulated in float64.
  at::Tensor sq = g.to(at::kDouble).pow(2).sum().reshape({1});
  comm_.all_reduce(sq, ReduceOp::Sum);
  const double norm = std::sqrt(sq.item<double>());
  if (!std::isfinite(norm)) return norm;  // same on every rank: all skip this update
  const double coef = max_grad_norm / (norm + 1e-6);
  if (max_grad_norm > 0 && coef < 1) g.mul_(coef);

  // AdamW in the operations (and order) of the trainer's AdamW (src/train/optimizer.cpp) and
  // torch::optim::AdamW: one step count t for the bias corrections; parameters without a
  // gradient on any rank are left alone (their moments too).
  ++step_;
  const int64_t lo = comm_.rank() * shard_, hi = lo + shard_;
  const double bc1 = 1 - std::pow(opt_.beta1, static_cast<double>(step_));
  const double bc2 = 1 - std::pow(opt_.beta2, static_cast<double>(step_));
  bool all_active = true;
  for (size_t i = 0; i < P; ++i) all_active = all_active && active[i];

  at::Tensor p0 = shard_of_params();
  at::Tensor p = p0 * (1 - lr * opt_.weight_decay);
  at::Tensor m = exp_avg_ * opt_.beta1 + g * (1 - opt_.beta1);
  at::Tensor v = (exp_avg_sq_ * opt_.beta2).addcmul_(g, g, 1 - opt_.beta2);
  at::Tensor denom = (v.sqrt() / std::sqrt(bc2)).add_(opt_.eps);
  p.addcdiv_(m, denom, -lr / bc1);
  if (all_active) {
    exp_avg_ = m;
    exp_avg_sq_ = v;
  } else {
    at::Tensor mask = at::zeros({shard_}, g.options().dtype(at::kBool));
    for (size_t i = 0; i < P; ++i) {
      const int64_t a = std::max(lo, offsets_[i]), z = std::min(hi, offsets_[i] + params_[i].numel());
      if (active[i] && a < z) mask.narrow(0, a - lo, z - a).fill_(true);
    }
    p = at::where(mask, p, p0);
    exp_avg_ = at::where(mask, m, exp_avg_);
    exp_avg_sq_ = at::where(mask, v, exp_avg_sq_);
  }

  at::Tensor full = gather_full(p.contiguous());
  for (size_t i = 0; i < P; ++i)
    params_[i].detach().copy_(full.narrow(0, offsets_[i], params_[i].numel()).view(params_[i].sizes()));
  return norm;
}

TensorMap ShardedAdamW::state() {
  TensorMap out;
  at::Tensor m = gather_full(exp_avg_), v = gather_full(exp_avg_sq_);
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string k = std::to_string(i);
    out["exp_avg." + k] = m.narrow(0, offsets_[i], params_[i].numel()).view(params_[i].sizes()).clone();
    out["exp_avg_sq." + k] = v.narrow(0, offsets_[i], params_[i].numel()).view(params_[i].sizes()).clone();
  }
  return out;
}

void ShardedAdamW::load_state(const TensorMap& state, int64_t steps) {
  check_input(state.size() == 2 * params_.size(),
              "optimizer state has " + std::to_string(state.size() / 2) + " parameters, expected " +
                  std::to_string(params_.size()));
  at::Tensor m = at::zeros({padded_}, exp_avg_.options()), v = at::zeros({padded_}, exp_avg_.options());
  for (size_t i = 0; i < params_.size(); ++i) {
    for (const std::string kind : {"exp_avg.", "exp_avg_sq."}) {
      const std::string key = kind + std::to_string(i);
      auto it = state.find(key);
      check_input(it != state.end(), "optimizer state lacks " + key);
      check_input(it->second.sizes() == params_[i].sizes(), "optimizer state " + key + " has the wrong shape");
      (kind == "exp_avg." ? m : v).narrow(0, offsets_[i], params_[i].numel()).copy_(it->second.reshape({-1}));
    }
  }
  step_ = steps;
  const int64_t begin = comm_.rank() * shard_;
  exp_avg_ = m.narrow(0, begin, shard_).clone();
  exp_avg_sq_ = v.narrow(0, begin, shard_).clone();
}

int64_t ShardedAdamW::state_bytes() const { return 2 * shard_ * exp_avg_.element_size(); }

}  // namespace fluxtrain::dist
