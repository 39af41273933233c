#include "dist/fp8_weights.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "core/error.h"
#include "dist/offloaded_weights.h"
#include "kernels/fp8_matmul.h"

namespace fluxtrain::dist {
namespace {

bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

}  // namespace

bool fp8_quantisable(const std::string& name, const at::Tensor& t, const Fp8WeightsOptions& opt) {
  return at::isFloatingType(t.scalar_type()) && fp8_quantisable(name, t.dim(), opt);
}

int64_t fp8_stored_bytes(const std::vector<std::pair<std::string, std::vector<int64_t>>>& shapes,
                         const Fp8WeightsOptions& opt, at::ScalarType compute_dtype) {
  int64_t bytes = 0;
  for (const auto& [name, shape] : shapes) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    if (fp8_quantisable(name, static_cast<int64_t>(shape.size()), opt))
      bytes += n + 4 * (opt.scaling == kernels::Fp8Scaling::PerChannel ? shape[0] : 1);
    else
      bytes += n * static_cast<int64_t>(c10::elementSize(compute_dtype));
  }
  return bytes;
}

bool fp8_quantisable(const std::string& name, int64_t dims, const Fp8WeightsOptions& opt) {
  if (!ends_with(name, ".weight") || dims != 2) return false;
  const bool modulation = name.find("_mod.lin.") != std::string::npos || name.rfind("modulation.lin.", 0) == 0;
  return !modulation || opt.quantise_modulation;
}

TensorMap quantise_block_fp8(const TensorMap& block, const Fp8WeightsOptions& opt, at::ScalarType compute_dtype) {
  TensorMap out;
  at::NoGradGuard no_grad;
  for (const auto& [name, t] : block) {
    if (fp8_quantisable(name, t, opt)) {
      kernels::Fp8Tensor q = kernels::fp8_quantise(t, opt.scaling);
      out.emplace(name, q.data);
      out.emplace(name + kFp8ScaleSuffix, q.scale);
    } else {
      out.emplace(name, t.detach().to(compute_dtype));
    }
  }
  return out;
}

std::vector<SlotTensorSpec> fp8_compute_specs(const TensorMap& stored, at::ScalarType compute_dtype) {
  std::vector<SlotTensorSpec> specs;
  for (const auto& [name, t] : stored)
    if (!ends_with(name, kFp8ScaleSuffix)) specs.push_back({name, t.sizes().vec(), compute_dtype});
  return specs;
}

TensorMap dequantise_block_fp8(const TensorMap& stored, at::ScalarType compute_dtype) {
  TensorMap out;
  at::NoGradGuard no_grad;
  for (const auto& [name, t] : stored) {
    if (ends_with(name, kFp8ScaleSuffix)) continue;
    auto s = stored.find(name + kFp8ScaleSuffix);
    out.emplace(name, s != stored.end() ? kernels::fp8_dequantise(t, s->second, compute_dtype)
                                        : t.to(compute_dtype, /*non_blocking=*/false, /*copy=*/true));
  }
  return out;
}

int64_t tensor_map_bytes(const TensorMap& m) {
  int64_t n = 0;
  for (const auto& kv : m) n += kv.second.numel() * static_cast<int64_t>(kv.second.element_size());
  return n;
}

Fp8BlockWeights::Fp8BlockWeights(std::unique_ptr<BlockWeights> inner, at::ScalarType compute_dtype,
                                 c10::Device device, std::vector<std::vector<SlotTensorSpec>> compute_specs,
                                 int num_slots, bool hand_stored)
    : inner_(std::move(inner)), dtype_(compute_dtype) {
  if (hand_stored) return;  // acquire/release pass through to the inner provider
  const int n = inner_->num_blocks();
  if (compute_specs.empty()) {
    for (int b = 0; b < n; ++b) {
      compute_specs.push_back(fp8_compute_specs(inner_->acquire(b), compute_dtype));
      inner_->release(b);
    }
  }
  if (static_cast<int>(compute_specs.size()) != n)
    throw Error("fp8 weights: " + std::to_string(compute_specs.size()) + " block layouts for " + std::to_string(n) +
                    " blocks",
                ErrorKind::Internal);
  slots_ = std::make_unique<BlockSlots>(device, std::move(compute_specs), num_slots, [device](int64_t bytes) {
    return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  });
  held_.assign(num_slots, false);
  last_use_.assign(num_slots, 0);
  stats_.slot_bytes = num_slots * slots_->max_block_bytes();
}

Fp8BlockWeights::~Fp8BlockWeights() {
  for (const auto& t : kept_transposed_) kernels::fp8_forget_transposed(t);
}

void Fp8BlockWeights::keep_transposed_codes() {
  auto* off = dynamic_cast<OffloadedBlockWeights*>(inner_.get());
  if (!hands_stored() || off == nullptr)
    throw Error("--fp8_keep_transposed: needs the fp8 blocks handed as stored (--fp8_matmul) by an unsharded provider",
                ErrorKind::Internal);
  for (int i = 0; i < off->num_blocks(); ++i)
    if (!off->streamed(i))
      for (const auto& kv : off->resident_block(i))
        if (kv.second.scalar_type() == at::kFloat8_e4m3fn) {
          kernels::fp8_keep_transposed(kv.second);
          kept_transposed_.push_back(kv.second);
        }
}

void Fp8BlockWeights::forget_cached_blocks() {
  if (!slots_) return inner_->forget_cached_blocks();
  for (int s = 0; s < slots_->num_slots(); ++s)
    if (!held_[s]) slots_->clear(s);
  inner_->forget_cached_blocks();
}

const TensorMap& Fp8BlockWeights::acquire(int block) {
  check_input(block >= 0 && block < num_blocks(), "fp8 weights: block " + std::to_string(block) + " out of range");
  if (!slots_) return inner_->acquire(block);
  int slot = slots_->slot_of(block);
  if (slot >= 0 && held_[slot])
    throw Error("fp8 weights: block " + std::to_string(block) + " acquired twice without release()",
                ErrorKind::Internal);
  if (slot < 0) {
    for (int s = 0; s < slots_->num_slots(); ++s)
      if (!held_[s] && (slot < 0 || last_use_[s] < last_use_[slot])) slot = s;
    if (slot < 0)
      throw Error("fp8 weights: acquire(" + std::to_string(block) + ") while all " +
                      std::to_string(slots_->num_slots()) + " slots are held",
                  ErrorKind::Internal);
    const TensorMap& stored = inner_->acquire(block);
    slots_->assign(block, slot);
    {
      at::NoGradGuard no_grad;
      for (const auto& [name, t] : slots_->fill_views(block)) {
        const at::Tensor& src = stored.at(name);
        auto s = stored.find(name + kFp8ScaleSuffix);
        at::Tensor dst = t;
        if (s != stored.end()) kernels::fp8_dequantise_into(src, s->second, dst);
        else dst.copy_(src);
      }
    }
    inner_->release(block);
    ++stats_.dequantised_blocks;
  }
  held_[slot] = true;
  last_use_[slot] = ++tick_;
  return slots_->tensors(block);
}

void Fp8BlockWeights::release(int block) {
  if (!slots_) return inner_->release(block);
  const int slot = slots_->slot_of(block);
  if (slot < 0 || !held_[slot])
    throw Error("fp8 weights: release(" + std::to_string(block) + ") without acquire()", ErrorKind::Internal);
  held_[slot] = false;
}

}  // namespace fluxtrain::dist
