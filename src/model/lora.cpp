#include "model/lora.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

#include <ATen/ATen.h>

#include "core/error.h"
#include "model/lora_format.h"
#include "model/lora_linear.h"

namespace fluxtrain {
namespace {

// Where a diffusers-named linear lives inside a block: BFL fused linear, rows, in-features.
struct TargetSpec {
  std::string linear;
  int64_t begin, end, in;
};

bool target_in_double(const std::string& t, const FluxConfig& c, TargetSpec* out) {
  const int64_t H = c.hidden_size, M = c.mlp_hidden();
  if (t == "to_q") *out = {"img_attn.qkv", 0, H, H};
  else if (t == "to_k") *out = {"img_attn.qkv", H, 2 * H, H};
  else if (t == "to_v") *out = {"img_attn.qkv", 2 * H, 3 * H, H};
  else if (t == "to_out.0") *out = {"img_attn.proj", 0, H, H};
  else if (t == "add_q_proj") *out = {"txt_attn.qkv", 0, H, H};
  else if (t == "add_k_proj") *out = {"txt_attn.qkv", H, 2 * H, H};
  else if (t == "add_v_proj") *out = {"txt_attn.qkv", 2 * H, 3 * H, H};
  else if (t == "to_add_out") *out = {"txt_attn.proj", 0, H, H};
  else if (t == "ff.net.0.proj") *out = {"img_mlp.0", 0, M, H};
  else if (t == "ff.net.2") *out = {"img_mlp.2", 0, H, M};
  else if (t == "ff_context.net.0.proj") *out = {"txt_mlp.0", 0, M, H};
  else if (t == "ff_context.net.2") *out = {"txt_mlp.2", 0, H, M};
  else return false;
  return true;
}

bool target_in_single(const std::string& t, const FluxConfig& c, TargetSpec* out) {
  const int64_t H = c.hidden_size, M = c.mlp_hidden();
  if (t == "to_q") *out = {"linear1", 0, H, H};
  else if (t == "to_k") *out = {"linear1", H, 2 * H, H};
  else if (t == "to_v") *out = {"linear1", 2 * H, 3 * H, H};
  else if (t == "proj_mlp") *out = {"linear1", 3 * H, 3 * H + M, H};
  else if (t == "proj_out") *out = {"linear2", 0, H, H + M};
  else return false;
  return true;
}

const std::set<std::string>& known_targets() {
  static const std::set<std::string> s = {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                          "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                                          "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"};
  return s;
}

}  // namespace

void LoraConfig::validate() const {
  if (ranks.empty() || alphas.empty()) throw Error("--ranks and --network_alphas need at least one value");
  if (ranks.size() != alphas.size())
    throw Error("--ranks has " + std::to_string(ranks.size()) + " values but --network_alphas has " +
                std::to_string(alphas.size()));
  for (int64_t r : ranks)
    if (r <= 0) throw Error("--ranks values must be positive, got " + std::to_string(r));
  for (double a : alphas)
    if (!std::isfinite(a) || a <= 0) throw Error("--network_alphas values must be positive");
  for (int b : blocks)
    if (b < 0) throw Error("--lora_blocks values must be >= 0");
  for (const auto& f : formats) {
    const LoraFormat lf = parse_lora_format(f, "--lora_format");
    // Said before training starts, not when the files are written at its end.
    if (mode == LoraMode::EasyControl && lf != LoraFormat::EasyControl)
      throw Error("--lora_format " + f + ": an EasyControl condition LoRA acts on condition tokens only and cannot be "
                  "expressed in the " + f + " format (every-token LoRA); use --lora_format easycontrol");
    if (mode == LoraMode::Standard && lf == LoraFormat::EasyControl)
      throw Error("--lora_format easycontrol: the EasyControl format holds condition LoRAs only; a standard LoRA "
                  "is written as diffusers or kohya");
  }
  if (mode == LoraMode::EasyControl) {
    if (!targets.empty()) throw Error("--lora_targets only applies to --lora_mode standard");
    if (!blocks.empty()) throw Error("--lora_blocks only applies to --lora_mode standard");
    if (lora_num < 1) throw Error("--lora_num must be at least 1");
    if (static_cast<int>(ranks.size()) != lora_num)
      throw Error("--ranks has " + std::to_string(ranks.size()) + " values, expected one per condition (--lora_num " +
                  std::to_string(lora_num) + ")");
  } else {
    if (ranks.size() != 1) throw Error("--ranks takes one value in --lora_mode standard");
    for (const auto& t : targets)
      if (!known_targets().count(t)) throw Error("--lora_targets: unknown target '" + t + "'");
  }
}

namespace {

// One adapter the options create: which linear, which output rows, its in-features, condition,
// rank and alpha. create() and lora_parameter_count() walk the same list.
struct AdapterSpec {
  std::string target;
  int block;
  std::string linear;
  int64_t begin, end, in;
  int cond;
  int64_t rank;
  double alpha;
  bool on_output;
};

void for_each_adapter(const FluxConfig& cfg, const LoraConfig& lc, const std::function<void(const AdapterSpec&)>& fn) {
  const int64_t H = cfg.hidden_size;
  auto add = [&](const std::string& target, int block, const std::string& linear, int64_t b, int64_t e, int64_t in,
                 int cond, int64_t rank, double alpha, bool on_output = false) {
    // A rank above the layer's smaller side adds parameters and no expressiveness (and at
    // absurd values fails inside the allocator): refused naming the flag and the width.
    const int64_t width = std::min(in, e - b);
    if (rank > width)
      throw Error("--ranks " + std::to_string(rank) + " is above the width of the adapted layer " + target +
                  " (block " + std::to_string(block) + ", " + std::to_string(in) + " -> " + std::to_string(e - b) +
                  "): a LoRA rank must be at most " + std::to_string(width) + " for this model");
    fn(AdapterSpec{target, block, linear, b, e, in, cond, rank, alpha, on_output});
  };
  if (lc.mode == LoraMode::EasyControl) {
    for (int blk = 0; blk < cfg.num_blocks(); ++blk) {
      const bool dbl = blk < cfg.depth;
      const std::string qkv = dbl ? "img_attn.qkv" : "linear1";
      for (int n = 0; n < lc.lora_num; ++n) {
        const int64_t r = lc.ranks[n];
        const double al = lc.alphas[n];
        add("to_q", blk, qkv, 0, H, H, n, r, al);
        add("to_k", blk, qkv, H, 2 * H, H, n, r, al);
        add("to_v", blk, qkv, 2 * H, 3 * H, H, n, r, al);
        // EasyControl applies proj_loras to to_out[0]'s output: in = out = H.
        if (dbl) add("to_out.0", blk, "img_attn.proj", 0, H, H, n, r, al, /*on_output=*/true);
      }
    }
  } else {
    std::vector<std::string> targets = lc.targets;
    if (targets.empty()) targets = {"to_q", "to_k", "to_v", "to_out.0"};
    for (int blk = 0; blk < cfg.num_blocks(); ++blk) {
      if (!lc.blocks.empty() && std::find(lc.blocks.begin(), lc.blocks.end(), blk) == lc.blocks.end()) continue;
      for (const auto& t : targets) {
        TargetSpec s;
        const bool ok = blk < cfg.depth ? target_in_double(t, cfg, &s) : target_in_single(t, cfg, &s);
        if (!ok) continue;  // e.g. to_out.0 has no single-block counterpart
        add(t, blk, s.linear, s.begin, s.end, s.in, -1, lc.ranks[0], lc.alphas[0]);
      }
    }
  }
}

}  // namespace

int64_t lora_parameter_count(const FluxConfig& cfg, const LoraConfig& lc) {
  lc.validate();
  int64_t n = 0;
  for_each_adapter(cfg, lc, [&](const AdapterSpec& a) { n += a.rank * (a.in + (a.end - a.begin)); });
  return n;
}

LoraSet LoraSet::create(const FluxConfig& cfg, const LoraConfig& lc, uint64_t seed, at::ScalarType dtype) {
  lc.validate();
  LoraSet set;
  set.config_ = lc;
  set.model_ = cfg;
  for_each_adapter(cfg, lc, [&](const AdapterSpec& s) {
    LoraAdapter a;
    a.target = s.target;
    a.block = s.block;
    a.linear = s.linear;
    a.out_begin = s.begin;
    a.out_end = s.end;
    a.cond = s.cond;
    a.scale = s.alpha / static_cast<double>(s.rank);
    a.on_output = s.on_output;
    a.down = at::empty({s.rank, s.in}, at::TensorOptions().dtype(dtype));
    a.up = at::zeros({s.end - s.begin, s.rank}, at::TensorOptions().dtype(dtype));
    set.adapters_.push_back(std::move(a));
  });
  const LoraFormat native = lc.mode == LoraMode::EasyControl ? LoraFormat::EasyControl : LoraFormat::Diffusers;
  for (auto& a : set.adapters_) a.key = lora_key_stem(cfg, a, native);
  // EasyControl's init: down ~ N(0, 1/r), up = 0. One generator, adapters in a fixed order.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (auto& a : set.adapters_) {
    const double std = 1.0 / static_cast<double>(a.down.size(0));
    a.down = at::normal(0.0, std, a.down.sizes(), gen, at::TensorOptions().dtype(at::kDouble)).to(dtype);
    a.down.set_requires_grad(true);
    a.up.set_requires_grad(true);
  }
  set.build_index();
  return set;
}

void LoraSet::build_index() {
  index_.clear();
  for (size_t i = 0; i < adapters_.size(); ++i) index_[{adapters_[i].block, adapters_[i].linear}].push_back(i);
  for (auto& kv : index_)
    std::sort(kv.second.begin(), kv.second.end(),
              [&](size_t a, size_t b) { return adapters_[a].out_begin < adapters_[b].out_begin; });
}

std::vector<const LoraAdapter*> LoraSet::find(int block, const std::string& linear, int cond) const {
  std::vector<const LoraAdapter*> out;
  auto it = index_.find({block, linear});
  if (it == index_.end()) return out;
  for (size_t i : it->second) {
    const auto& a = adapters_[i];
    if (a.cond == -1 || a.cond == cond) out.push_back(&a);
  }
  return out;
}

std::vector<at::Tensor> LoraSet::parameters() const {
  std::vector<at::Tensor> p;
  for (const auto& a : adapters_) {
    p.push_back(a.down);
    p.push_back(a.up);
  }
  return p;
}

namespace {
LoraFormat native_format(const LoraConfig& c) {
  return c.mode == LoraMode::EasyControl ? LoraFormat::EasyControl : LoraFormat::Diffusers;
}
}  // namespace

TensorMap LoraSet::state() const { return export_lora(model_, *this, native_format(config_)); }

void LoraSet::load_state(const TensorMap& tensors, const std::string& file) {
  import_lora(model_, *this, tensors, native_format(config_), file);
}

void LoraSet::to(const at::TensorOptions& opts) {
  for (auto& a : adapters_) {
    a.down = a.down.detach().to(opts).set_requires_grad(true);
    a.up = a.up.detach().to(opts).set_requires_grad(true);
  }
}

InputAdapters input_adapters(const std::vector<const LoraAdapter*>& adapters, int64_t row_begin) {
  InputAdapters a;
  for (const LoraAdapter* ad : adapters) {
    a.downs.push_back(ad->down);
    a.ups.push_back(ad->up);
    a.offsets.push_back(ad->out_begin - row_begin);
    a.scales.push_back(ad->scale);
  }
  return a;
}

at::Tensor linear_with_lora(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const LoraSet* lora, int block, const std::string& linear, int cond,
                            int64_t row_begin, int64_t row_end, const at::Tensor& weight_scale) {
  const int64_t full = weight.size(0);
  if (row_end < 0) row_end = full;
  const bool whole = row_begin == 0 && row_end == full;
  at::Tensor w = whole ? weight : weight.narrow(0, row_begin, row_end - row_begin);
  at::Tensor b = (!bias.defined() || whole) ? bias : bias.narrow(0, row_begin, row_end - row_begin);
  const at::Tensor ws = fp8_scale_rows(weight_scale, row_begin, row_end - row_begin);
  if (!lora) return frozen_linear(x, w, b, ws);
  std::vector<const LoraAdapter*> ads, after;
  for (const LoraAdapter* a : lora->find(block, linear, cond)) {
    if (a->out_begin < row_begin || a->out_end > row_end) continue;
    (a->on_output ? after : ads).push_back(a);
  }
  at::Tensor y;
  if (!ads.empty()) {
    // All input-side adapters in one autograd node (model/lora_linear.h): their products go
    // straight into their rows of y, and their input gradient into the base's.
    const InputAdapters a = input_adapters(ads, row_begin);
    y = lora_linear(x, w, b, a.downs, a.ups, a.offsets, a.scales, ws);
  } else {
    y = frozen_linear(x, w, b, ws);
  }
  // Output-side adapters (EasyControl's proj_loras), one after the other as EasyControl applies
  // them: y = y + scale * up(down(y)). They cover the whole output (in = out features).
  for (const LoraAdapter* a : after) {
    TORCH_CHECK(a->out_begin == row_begin && a->out_end == row_end && a->down.size(1) == row_end - row_begin,
                "output-side LoRA ", a->key, " must cover the whole output of ", linear);
    y = output_lora(y, a->down, a->up, a->scale);
  }
  return y;
}

}  // namespace fluxtrain
