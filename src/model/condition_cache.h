// The condition KV cache of inference (EasyControl conditions while sampling).
//
// Why it is exact: a condition's tokens are modulated with the embedding of timestep 0 plus the
// guidance and pooled-text embeddings (fixed for one sampling run), and their queries attend only
// to the condition's own keys. Nothing in the condition stream depends on the noisy latents or
// on the step's timestep, so every block's condition keys (after RoPE) and values are the same
// at every step. flux_forward records them on the first call it is given an empty cache and, on
// later calls, skips the condition stream entirely and feeds the recorded keys/values to the
// text+noise queries. The arithmetic the text+noise tokens see is the same, operation for
// operation, as without the cache.
//
// Valid for one set of (conditions, LoRA, pooled text, guidance, batch rows): a sampler makes one
// cache per batch of images and drops it afterwards. Inference only (the tensors are detached).
#pragma once
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fluxtrain {

class ConditionCache {
 public:
  bool filled() const { return filled_; }
  void clear();

  // Recording (flux_forward): begin, one record per block, finish (checks every block came).
  void begin(int num_blocks, std::vector<int64_t> cond_lens, int64_t batch);
  void record(int block, const at::Tensor& k, const at::Tensor& v);
  void finish();

  // Block i's condition keys (after RoPE) and values, [B, heads, sum(cond_lens), D].
  const at::Tensor& keys(int block) const { return k_.at(static_cast<size_t>(block)); }
  const at::Tensor& values(int block) const { return v_.at(static_cast<size_t>(block)); }
  const std::vector<int64_t>& cond_lens() const { return cond_lens_; }
  int64_t batch() const { return batch_; }
  int64_t bytes() const;

 private:
  bool filled_ = false;
  int64_t batch_ = 0;
  std::vector<int64_t> cond_lens_;
  std::vector<at::Tensor> k_, v_;
};

}  // namespace fluxtrain
