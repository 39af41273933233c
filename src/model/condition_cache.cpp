#include "model/condition_cache.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace fluxtrain {

void ConditionCache::clear() {
  filled_ = false;
  batch_ = 0;
  cond_lens_.clear();
  k_.clear();
  v_.clear();
}

void ConditionCache::begin(int num_blocks, std::vector<int64_t> cond_lens, int64_t batch) {
  clear();
  cond_lens_ = std::move(cond_lens);
  batch_ = batch;
  k_.resize(static_cast<size_t>(num_blocks));
  v_.resize(static_cast<size_t>(num_blocks));
}

void ConditionCache::record(int block, const at::Tensor& k, const at::Tensor& v) {
  if (block < 0 || static_cast<size_t>(block) >= k_.size()) throw Error("condition cache: block out of range");
  // Own copies: v is a view into the block's fused qkv output, which it would keep alive.
  k_[static_cast<size_t>(block)] = k.detach().contiguous();
  v_[static_cast<size_t>(block)] = v.detach().contiguous();
}

void ConditionCache::finish() {
  for (size_t i = 0; i < k_.size(); ++i)
    if (!k_[i].defined() || !v_[i].defined())
      throw Error("condition cache: block " + std::to_string(i) + " recorded no condition keys/values");
  filled_ = true;
}

int64_t ConditionCache::bytes() const {
  int64_t n = 0;
  for (size_t i = 0; i < k_.size(); ++i) {
    if (k_[i].defined()) n += k_[i].numel() * static_cast<int64_t>(k_[i].element_size());
    if (v_[i].defined()) n += v_[i].numel() * static_cast<int64_t>(v_[i].element_size());
  }
  return n;
}

}  // namespace fluxtrain
