// LoRA adapters on the transformer's linear layers.
//
// Two modes:
//  * easycontrol: one adapter set per condition (--lora_num N). In double blocks q, k, v (slices
//    of img_attn.qkv) and the attention output projection (img_attn.proj); in single blocks q, k, v
//    (slices of linear1). Each adapter acts only on the tokens of its own condition.
//  * standard: adapters on a configurable list of linears (diffusers names: to_q, to_k, to_v,
//    to_out.0, add_q_proj, ..., proj_mlp, proj_out, ff.net.0.proj, ...), acting on every token
//    that passes through the linear. Saved in the diffusers/peft key format.
//
// An adapter adds scale * up(down(x)) to rows [out_begin, out_end) of a fused BFL linear's output,
// where x is the linear's input. One exception, EasyControl's projection LoRA in double blocks
// (proj_loras): it reads the projection's *output*, y = W a + b; y += scale * up(down(y))
// (EasyControl's MultiDoubleStreamBlockLoraProcessor; docs/easycontrol.md). Standard mode's
// to_out.0 adapter is an ordinary input-side LoRA, as diffusers/peft define it.
// Masters are float32; compute casts them to the activation dtype (gradients flow back in float32).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/tensor_map.h"
#include "model/flux_config.h"
#include "model/lora_linear.h"

namespace fluxtrain {

class OptionSet;

enum class LoraMode { EasyControl, Standard };
std::string lora_mode_name(LoraMode m);  // "easycontrol" | "standard"

struct LoraConfig {
  LoraMode mode = LoraMode::EasyControl;
  int lora_num = 1;                  // easycontrol: number of conditions
  std::vector<int64_t> ranks{128};   // one per condition (easycontrol) or one value (standard)
  std::vector<double> alphas{128};   // network_alphas, same count as ranks
  // standard mode: diffusers-style linear names; empty = to_q,to_k,to_v,to_out.0 (+ single q,k,v)
  std::vector<std::string> targets;
  // standard mode: restrict to these global block indices (empty = all)
  std::vector<int> blocks;
  // --lora_format: the file formats written at the end of training (model/lora_format.h names);
  // empty = the mode's native one. Not part of a LoRA file's own description.
  std::vector<std::string> formats;
  // --pretrained_lora_path: start from this LoRA file (any format model/lora_io.h reads) instead of
  // the usual initialisation; its adapters must be the ones the options create. Not part of a
  // LoRA file's own description.
  std::string pretrained_lora_path;
  void validate() const;  // counts, ranges and mode-specific flags; throws naming the flag
};

// --lora_mode, --lora_num, --ranks, --network_alphas, --lora_targets, --lora_blocks, --lora_format
// (model/lora_options.cpp).
void declare_options(OptionSet& s, LoraConfig& c);

struct LoraAdapter {
  std::string target;    // diffusers name of the linear it adapts: "to_q", "to_out.0", "proj_out", ...
                         // (EasyControl's q/k/v/proj LoRAs are to_q/to_k/to_v/to_out.0)
  std::string key;       // its key stem in the set's native file format (model/lora_format.h),
                         // e.g. "transformer_blocks.0.attn.processor.q_loras.0"; for messages
  int block = 0;         // global block index (doubles first, then singles)
  std::string linear;    // fused BFL linear: "img_attn.qkv", "img_attn.proj", "txt_attn.qkv",
                         // "img_mlp.0", "linear1", "linear2", ...
  int64_t out_begin = 0, out_end = 0;  // rows of the linear's output the adapter adds to
  int cond = -1;         // condition index it acts on (easycontrol); -1: all tokens
  at::Tensor down;       // [rank, in_features], float32 master, requires_grad
  at::Tensor up;         // [out_end - out_begin, rank], float32 master, requires_grad
  double scale = 1.0;    // network_alpha / rank
  bool on_output = false;  // reads the linear's output (EasyControl's proj_loras), not its input
};

// Parameters (down + up elements) of the adapters LoraSet::create makes for these options,
// without making them: what the memory estimator counts.
int64_t lora_parameter_count(const FluxConfig& cfg, const LoraConfig& lc);

class LoraSet {
 public:
  LoraSet() = default;
  // New adapters: down ~ N(0, (1/rank)^2), up = 0 (EasyControl's init). Deterministic in seed.
  static LoraSet create(const FluxConfig& cfg, const LoraConfig& lc, uint64_t seed,
                        at::ScalarType dtype = at::kFloat);
  const LoraConfig& config() const { return config_; }
  const FluxConfig& model_config() const { return model_; }
  std::vector<LoraAdapter>& adapters() { return adapters_; }
  const std::vector<LoraAdapter>& adapters() const { return adapters_; }
  bool empty() const { return adapters_.empty(); }
  // Adapters on (block, linear) acting on tokens of condition `cond` (-1 = the main streams);
  // standard-mode adapters match every cond. Sorted by out_begin.
  std::vector<const LoraAdapter*> find(int block, const std::string& linear, int cond) const;
  std::vector<at::Tensor> parameters() const;  // down, up of every adapter, in order
  // The weights in the set's native format (model/lora_format.h): EasyControl's keys in
  // easycontrol mode, diffusers/PEFT keys in standard mode. Used by checkpoints and output.
  TensorMap state() const;
  // Loads weights saved by state() (or by EasyControl / peft); strict on keys and shapes.
  void load_state(const TensorMap& tensors, const std::string& file);
  void to(const at::TensorOptions& opts);

 private:
  LoraConfig config_;
  FluxConfig model_;
  std::vector<LoraAdapter> adapters_;
  std::map<std::pair<int, std::string>, std::vector<size_t>> index_;
  void build_index();
};

// Input-side adapters in the form lora_linear and gelu_linear take (model/lora_linear.h): each
// adapter's down, up and scale, its offset counted from output row row_begin of the linear.
InputAdapters input_adapters(const std::vector<const LoraAdapter*>& adapters, int64_t row_begin = 0);

// y = x W[rows]^T + b[rows], plus every matching adapter's scale * up(down(x)) on its rows.
// rows = [row_begin, row_end) of the fused linear (row_end -1: all); adapters outside are skipped.
// weight_scale: defined when weight is the fp8 stored form (e4m3 codes, --fp8_matmul), its float32
// scales ([out] or [1]); the frozen products then run as fp8 GEMMs (kernels/fp8_matmul.h).
at::Tensor linear_with_lora(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const LoraSet* lora, int block, const std::string& linear, int cond,
                            int64_t row_begin = 0, int64_t row_end = -1, const at::Tensor& weight_scale = {});

}  // namespace fluxtrain
