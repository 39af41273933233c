#include "model/block_runner.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/saved_variable.h>

#include "model/recompute.h"

namespace fluxtrain {
namespace {

using torch::autograd::variable_list;

struct BlockBackward : public torch::autograd::Node {
  BlockWeights* weights = nullptr;
  int block = 0;
  BlockFn fn;
  bool recompute = false;
  std::vector<torch::autograd::SavedVariable> saved_acts;  // recompute mode
  RecomputeTape tape;                                       // recompute mode: what the recomputation replays
  std::vector<bool> act_requires_grad;
  std::vector<at::Tensor> inner_in, inner_out;             // graph mode: the block's own graph
  std::vector<at::Tensor> params;

  std::string name() const override { return "FluxBlockBackward"; }

  void release_variables() override {
    saved_acts.clear();
    tape = RecomputeTape();
    inner_in.clear();
    inner_out.clear();
  }

  variable_list apply(variable_list&& grads) override {
    weights->will_use(block);
    const TensorMap& w = weights->acquire(block);
    std::vector<at::Tensor> ins, outs;
    variable_list result(act_requires_grad.size() + params.size());
    {
      at::AutoGradMode enable(true);
      if (recompute) {
        for (size_t i = 0; i < saved_acts.size(); ++i) {
          at::Tensor a = saved_acts[i].unpack().detach();
          a.set_requires_grad(act_requires_grad[i]);
          ins.push_back(a);
        }
        RecomputeScope replay(&tape, RecomputeTape::Phase::Replay);
        outs = fn(ins, w);
      } else {
        ins = inner_in;
        outs = inner_out;
      }
      variable_list o, go, targets;
      std::vector<size_t> target_slot;
      for (size_t j = 0; j < outs.size() && j < grads.size(); ++j)
        if (grads[j].defined() && outs[j].defined() && outs[j].requires_grad()) {
          o.push_back(outs[j]);
          go.push_back(grads[j]);
        }
      for (size_t i = 0; i < ins.size(); ++i)
        if (act_requires_grad[i]) {
          targets.push_back(ins[i]);
          target_slot.push_back(i);
        }
      for (size_t p = 0; p < params.size(); ++p)
        if (params[p].requires_grad()) {
          targets.push_back(params[p]);
          target_slot.push_back(ins.size() + p);
        }
      if (!o.empty() && !targets.empty()) {
        variable_list g = torch::autograd::grad(o, targets, go, /*retain_graph=*/false, /*create_graph=*/false,
                                                /*allow_unused=*/true);
        for (size_t t = 0; t < g.size(); ++t) result[target_slot[t]] = g[t];
      }
    }
    weights->release(block);
    release_variables();
    return result;
  }
};

void delete_node(torch::autograd::Node* n) { delete n; }

}  // namespace

std::vector<at::Tensor> run_block(BlockWeights& weights, int block, const BlockFn& fn,
                                  const std::vector<at::Tensor>& acts, const std::vector<at::Tensor>& params,
                                  bool recompute) {
  bool any_grad = false;
  if (at::GradMode::is_enabled()) {
    for (const auto& a : acts) any_grad = any_grad || a.requires_grad();
    for (const auto& p : params) any_grad = any_grad || p.requires_grad();
  }
  weights.will_use(block);
  if (!any_grad || (!recompute && !weights.transient())) {
    const TensorMap& w = weights.acquire(block);
    auto out = fn(acts, w);
    weights.release(block);
    return out;
  }

  std::shared_ptr<BlockBackward> node(new BlockBackward(), delete_node);
  node->weights = &weights;
  node->block = block;
  node->fn = fn;
  node->recompute = recompute;
  node->params = params;
  for (const auto& a : acts) node->act_requires_grad.push_back(a.requires_grad());

  std::vector<at::Tensor> outs;
  const TensorMap& w = weights.acquire(block);
  if (recompute) {
    at::NoGradGuard no_grad;
    RecomputeScope record(&node->tape, RecomputeTape::Phase::Record);
    outs = fn(acts, w);
    for (const auto& a : acts) node->saved_acts.emplace_back(a, /*is_output=*/false);
  } else {
    at::AutoGradMode enable(true);
    std::vector<at::Tensor> ins;
    for (const auto& a : acts) {
      at::Tensor d = a.detach();
      d.set_requires_grad(a.requires_grad());
      ins.push_back(d);
    }
    outs = fn(ins, w);
    node->inner_in = ins;
    node->inner_out = outs;
  }
  weights.release(block);

  std::vector<at::Tensor> results;
  for (const auto& o : outs) {
    at::Tensor r = o.defined() ? o.detach() : at::Tensor();
    torch::autograd::set_history(r, node);
    results.push_back(r);
  }
  torch::autograd::edge_list edges;
  for (const auto& a : acts) edges.push_back(torch::autograd::impl::gradient_edge(a));
  for (const auto& p : params) edges.push_back(torch::autograd::impl::gradient_edge(p));
  node->set_next_edges(std::move(edges));
  return results;
}

}  // namespace fluxtrain
