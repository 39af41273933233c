#include "train/encoder_process_optimizer.h"

#include <cmath>
#include <string>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/encoder_rank.h"

namespace fluxtrain {
namespace {

// "exp_avg.12" -> ("exp_avg.", 12)
std::pair<std::string, size_t> split_key(const std::string& k, const std::string& file) {
  const size_t dot = k.rfind('.');
  if (dot == std::string::npos || dot + 1 == k.size() || k.find_first_not_of("0123456789", dot + 1) != std::string::npos)
    throw Error(file + ": optimizer state key '" + k + "' is not <moment>.<index>");
  return {k.substr(0, dot + 1), static_cast<size_t>(std::stoull(k.substr(dot + 1)))};
}

class EncoderProcessOptimizer final : public Optimizer {
 public:
  EncoderProcessOptimizer(dist::Communicator& ctl, int encoder_rank, std::unique_ptr<Optimizer> main,
                          size_t main_params, std::vector<ParamGroup> te_groups, const AdamWConfig& cfg)
      : ctl_(ctl), er_(encoder_rank), main_(std::move(main)), n_main_(main_params), te_params_(all_params(te_groups)) {
    if (!te_groups.empty()) te_ = make_adamw(std::move(te_groups), cfg);
  }

  double step(double lr, double max_grad_norm, double extra_sq_norm = 0) override {
    at::Tensor sq = at::tensor({te_ ? grad_sq_norm(te_params_) : 0.0}, at::TensorOptions().dtype(at::kDouble));
    ctl_.all_reduce(sq, dist::ReduceOp::Sum);  // one term, zeros elsewhere: exact
    const double norm = main_->step(lr, max_grad_norm, sq.item<double>() + extra_sq_norm);
    if (!std::isfinite(norm) || !te_) return norm;  // non-finite: every rank skips the update
    const double coef = clip_coefficient(norm, max_grad_norm);
    if (coef < 1.0) {
      at::NoGradGuard ng;
      for (const auto& p : te_params_)
        if (p.grad().defined()) p.grad().mul_(coef);
    }
    te_->step(lr, /*max_grad_norm=*/0.0);  // already clipped with the joint coefficient
    return norm;
  }

  int64_t steps() const override { return main_->steps(); }

  TensorMap state() override {
    TensorMap s = main_->state();
    const TensorMap te = send_to_root(ctl_, er_, te_ ? te_->state() : TensorMap{});
    for (const auto& [k, v] : te) {
      const auto [moment, i] = split_key(k, "text-encoder optimizer");
      s.emplace(moment + std::to_string(n_main_ + i), v);
    }
    return s;
  }

  void load_state(const TensorMap& state, int64_t steps, const std::string& file) override {
    TensorMap main, te;
    for (const auto& [k, v] : state) {
      const auto [moment, i] = split_key(k, file);
      if (i < n_main_) main.emplace(k, v);
      else te.emplace(moment + std::to_string(i - n_main_), v);
    }
    main_->load_state(main, steps, file);
    if (te_) te_->load_state(te, steps, file);  // other ranks hold no text-encoder state
  }

  int64_t state_bytes() const override { return main_->state_bytes() + (te_ ? te_->state_bytes() : 0); }

 private:
  dist::Communicator& ctl_;
  int er_;
  std::unique_ptr<Optimizer> main_, te_;
  size_t n_main_;
  std::vector<at::Tensor> te_params_;
};

}  // namespace

std::unique_ptr<Optimizer> make_encoder_process_optimizer(dist::Communicator& ctl, int encoder_rank,
                                                          std::unique_ptr<Optimizer> main, size_t main_params,
                                                          std::vector<ParamGroup> te_groups, const AdamWConfig& cfg) {
  return std::make_unique<EncoderProcessOptimizer>(ctl, encoder_rank, std::move(main), main_params,
                                                   std::move(te_groups), cfg);
}

TensorMap send_to_root(dist::Communicator& comm, int from, const TensorMap& m) {
  if (from == 0) return comm.rank() == 0 ? m : TensorMap{};
  // Rank 0 asks process `from` for one "sample" whose outputs are the map: the encoder-rank
  // exchange (dist/encoder_rank.h) moves tensor maps of any keys, dtypes and shapes.
  dist::EncoderRank er(comm, from, at::kCPU);
  dist::SampleMaps ask;
  if (comm.rank() == 0) ask.push_back({});
  const dist::SampleMaps got = er.forward(ask, [&m](const dist::SampleMaps&) { return dist::SampleMaps{m}; });
  if (got.empty()) return {};
  TensorMap out;
  for (const auto& [k, v] : got[0]) out.emplace(k, v.clone());  // own memory, not views of the buffer
  return out;
}

}  // namespace fluxtrain
