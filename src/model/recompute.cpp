#include "model/recompute.h"

#include <atomic>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

namespace fluxtrain {
namespace {

using torch::autograd::variable_list;

thread_local RecomputeTape* t_tape = nullptr;
thread_local RecomputeTape::Phase t_phase = RecomputeTape::Phase::Record;
std::atomic<int64_t> g_attention_replayed{0}, g_linears_skipped{0};
std::atomic<bool> g_keep_attention{true};

// ATen's sdp::SDPBackend values as at::_fused_sdp_choice returns them.
constexpr int64_t kSdpFlash = 1, kSdpCudnn = 3;

// The backend at::scaled_dot_product_attention would run, when it has a saved form here.
SavedAttention::Backend saved_backend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t choice = at::_fused_sdp_choice(q, k, v);
  if (q.is_cuda()) {
    if (choice == kSdpCudnn) return SavedAttention::Backend::CudnnCuda;
    if (choice == kSdpFlash && q.size(-1) % 8 == 0) return SavedAttention::Backend::FlashCuda;  // no padding
    return SavedAttention::Backend::None;
  }
  return choice == kSdpFlash ? SavedAttention::Backend::FlashCpu : SavedAttention::Backend::None;
}

// The CUDA backends' forward results share one layout: (out, lse, cum_seq_q, cum_seq_k, max_q,
// max_k, philox_seed, philox_offset, debug mask).
template <typename Results>
void keep_cuda_results(SavedAttention& s, const Results& r) {
  s.out = std::get<0>(r), s.lse = std::get<1>(r), s.cum_seq_q = std::get<2>(r), s.cum_seq_k = std::get<3>(r);
  s.max_q = std::get<4>(r).expect_int(), s.max_k = std::get<5>(r).expect_int();
  s.philox_seed = std::get<6>(r), s.philox_offset = std::get<7>(r);
}

SavedAttention record(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  SavedAttention s;
  s.backend = saved_backend(q, k, v);
  s.q_sizes = q.sizes().vec();
  s.k_sizes = k.sizes().vec();
  switch (s.backend) {
    case SavedAttention::Backend::CudnnCuda:
      keep_cuda_results(s, at::_scaled_dot_product_cudnn_attention(q, k, v, std::nullopt, /*compute_log_sumexp=*/true));
      break;
    case SavedAttention::Backend::FlashCuda:
      keep_cuda_results(s, at::_scaled_dot_product_flash_attention(q, k, v));
      break;
    case SavedAttention::Backend::FlashCpu: {
      auto r = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v);
      s.out = std::get<0>(r), s.lse = std::get<1>(r);
      break;
    }
    case SavedAttention::Backend::None:
      s.out = at::scaled_dot_product_attention(q, k, v);
      break;
  }
  return s;
}

// Backward of a replayed attention call: the recorded backend's backward kernel on the
// recomputed q, k, v and the recorded output and log-sum-exp.
struct ReplayedAttentionBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable q, k, v;
  const SavedAttention* saved = nullptr;  // owned by the block's tape, alive until its backward ends
  at::Tensor (*grad_layout)(const at::Tensor&) = nullptr;

  std::string name() const override { return "ReplayedAttentionBackward"; }
  void release_variables() override {
    q.reset_data();
    k.reset_data();
    v.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return variable_list(3);
    const at::Tensor g = grad_layout ? grad_layout(grads[0]) : grads[0];
    const at::Tensor qq = q.unpack(), kk = k.unpack(), vv = v.unpack();
    const SavedAttention& s = *saved;
    std::tuple<at::Tensor, at::Tensor, at::Tensor> d;
    switch (s.backend) {
      case SavedAttention::Backend::CudnnCuda:
        d = at::_scaled_dot_product_cudnn_attention_backward(g, qq, kk, vv, s.out, s.lse, s.philox_seed,
                                                             s.philox_offset, at::Tensor(), s.cum_seq_q, s.cum_seq_k,
                                                             s.max_q, s.max_k, 0.0, false);
        break;
      case SavedAttention::Backend::FlashCuda:
        d = at::_scaled_dot_product_flash_attention_backward(g, qq, kk, vv, s.out, s.lse, s.cum_seq_q, s.cum_seq_k,
                                                             s.max_q, s.max_k, 0.0, false, s.philox_seed,
                                                             s.philox_offset);
        break;
      case SavedAttention::Backend::FlashCpu:
        d = at::_scaled_dot_product_flash_attention_for_cpu_backward(g, qq, kk, vv, s.out, s.lse, 0.0, false);
        break;
      case SavedAttention::Backend::None:
        TORCH_CHECK(false, "ReplayedAttentionBackward: no saved form");
    }
    return {std::get<0>(d), std::get<1>(d), std::get<2>(d)};
  }
};

void delete_node(torch::autograd::Node* n) { delete n; }

}  // namespace

RecomputeScope::RecomputeScope(RecomputeTape* tape, RecomputeTape::Phase phase)
    : prev_tape_(t_tape), prev_phase_(t_phase) {
  if (tape && phase == RecomputeTape::Phase::Record) tape->keep_attention = g_keep_attention;
  t_tape = tape;
  t_phase = phase;
  if (tape && phase == RecomputeTape::Phase::Replay) tape->next = 0;
}

RecomputeScope::~RecomputeScope() {
  t_tape = prev_tape_;
  t_phase = prev_phase_;
}

void set_checkpoint_attention(bool keep) { g_keep_attention = keep; }
bool checkpoint_attention() { return g_keep_attention; }

void note_linear_skipped() { ++g_linears_skipped; }

RecomputeStats recompute_stats() { return {g_attention_replayed.load(), g_linears_skipped.load()}; }

bool replaying_recompute() { return t_tape && t_phase == RecomputeTape::Phase::Replay; }

at::Tensor recorded_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              at::Tensor (*grad_layout)(const at::Tensor&)) {
  if (!t_tape) return at::Tensor();
  if (!t_tape->keep_attention) return at::Tensor();
  if (t_phase == RecomputeTape::Phase::Record) {
    t_tape->attention.push_back(record(q, k, v));
    return t_tape->attention.back().out;
  }
  TORCH_CHECK(t_tape->next < t_tape->attention.size(),
              "recomputed block makes more attention calls than its first forward (internal error)");
  const SavedAttention& s = t_tape->attention[t_tape->next++];
  TORCH_CHECK(q.sizes().vec() == s.q_sizes && k.sizes().vec() == s.k_sizes,
              "recomputed attention call differs from the recorded one (internal error)");
  if (s.backend == SavedAttention::Backend::None) return at::Tensor();  // caller computes it
  at::Tensor out = s.out.detach();
  ++g_attention_replayed;
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    std::shared_ptr<ReplayedAttentionBackward> node(new ReplayedAttentionBackward(), delete_node);
    node->q = torch::autograd::SavedVariable(q, false);
    node->k = torch::autograd::SavedVariable(k, false);
    node->v = torch::autograd::SavedVariable(v, false);
    node->saved = &s;
    node->grad_layout = grad_layout;
    node->set_next_edges(torch::autograd::collect_next_edges(q, k, v));
    torch::autograd::set_history(out, node);
  }
  return out;
}

}  // namespace fluxtrain
