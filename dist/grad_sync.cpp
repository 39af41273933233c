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


}  // namespace fluxtrain::dist
