// Selective recomputation for --gradient_checkpointing: what a checkpointed block keeps from its
// first forward, and what its recomputation in backward leaves out.
//
// A checkpointed block (model/block_runner.h) runs forward without a graph, then in backward runs
// again with a graph only to back-propagate through it. Two parts of that second forward are
// wasted work, and a RecomputeTape lets the block skip them:
//  * attention: the first forward records each attention call's output and log-sum-exp (the
//    fused kernels' own backward inputs: B*L*H activations plus B*heads*L floats per call, about
//    2 GB over the 57 blocks of a 1024 px step); the recomputation replays them, so it computes
//    q, k, v again but not the attention itself, and backward calls the same backend's backward
//    kernel on them.
//  * the last linear before a gated residual (the MLP's second linear, a single block's linear2):
//    the recomputed block's output values are never read, only its graph is, and that linear's
//    backward needs only its weight (when it has no adapter) and the gate (when the gate needs
//    no gradient). So the recomputation gives it an output that is allocated but not computed,
//    with the linear's backward attached (model/gelu_linear.h, which also skips the GELU before
//    it): about 40% of a block's forward GEMM work.
// Values are unchanged: the skipped work's results are either the recorded ones or never read,
// so gradients equal those of the full recomputation (tests: Recompute.*,
// Gradients.CheckpointingGivesIdenticalGradients).
//
// The tape is per block and per thread: run_block sets it around the block function in its two
// phases (the autograd engine calls the backward node on the thread that then runs the block).
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fluxtrain {

// One attention call's forward results as its backend's backward kernel needs them.
struct SavedAttention {
  enum class Backend { None, CudnnCuda, FlashCuda, FlashCpu };
  Backend backend = Backend::None;  // None: recomputed as usual (backend without a saved form)
  at::Tensor out, lse, cum_seq_q, cum_seq_k, philox_seed, philox_offset;
  int64_t max_q = 0, max_k = 0;
  std::vector<int64_t> q_sizes, k_sizes;  // replay checks it is handed the same call
};

struct RecomputeTape {
  enum class Phase { Record, Replay };
  std::vector<SavedAttention> attention;  // in call order
  size_t next = 0;                        // replay position
  bool keep_attention = true;             // set when recording starts (checkpoint_attention())
};

// Process-wide counts of the work replays left out (tests read them).
struct RecomputeStats {
  int64_t attention_replayed = 0;  // attention calls answered from a record
  int64_t linears_skipped = 0;     // linears left uncomputed (note_linear_skipped)
};
RecomputeStats recompute_stats();

// Sets the calling thread's tape and phase for its lifetime (nesting restores the outer one).
class RecomputeScope {
 public:
  RecomputeScope(RecomputeTape* tape, RecomputeTape::Phase phase);
  ~RecomputeScope();
  RecomputeScope(const RecomputeScope&) = delete;
  RecomputeScope& operator=(const RecomputeScope&) = delete;

 private:
  RecomputeTape* prev_tape_;
  RecomputeTape::Phase prev_phase_;
};

// Whether checkpointed blocks record attention (--checkpoint_attention, model/model_options.h):
// process-wide, set once by the command before its first step. Off, every attention call is
// recomputed and the tape only skips linears. Default on.
void set_checkpoint_attention(bool keep);
bool checkpoint_attention();

// True while the calling thread runs a block's recomputation (the Replay phase).
bool replaying_recompute();

// Attention of q, k, v [B, heads, L, D] (no mask, default scale). Outside a tape it is
// at::scaled_dot_product_attention; when recording it also keeps the call's saved form; when
// replaying it returns the recorded output with the backend's backward attached, without
// computing attention. grad_layout normalises the output gradient before any backward kernel
// sees it (model/blocks.cpp: cuDNN's cached graphs need one layout per shape).
at::Tensor recorded_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              at::Tensor (*grad_layout)(const at::Tensor&));

// Counts a linear left uncomputed by a replay in recompute_stats(): the linear after a GELU whose
// output nothing reads (model/gelu_linear.h with compute_output off, which skips that GELU's
// forward too).
void note_linear_skipped();

}  // namespace fluxtrain
