#include "train/block_major_step.h"

#include <cmath>
#include <limits>
#include <map>
#include <sstream>

#include <ATen/ATen.h>

#include "core/error.h"
#include "dist/grad_sync.h"
#include "model/flux_block_major.h"
#include "train/encoder_process.h"
#include "train/flow_matching.h"
#include "train/run_config.h"
#include "train/trainer.h"

namespace fluxtrain {

std::vector<std::vector<const Sample*>> shape_groups(const std::vector<Sample>& samples) {
  std::map<std::string, size_t> slot;
  std::vector<std::vector<const Sample*>> groups;
  for (const Sample& s : samples) {
    std::ostringstream key;
    key << s.target.sizes();
    for (const auto& c : s.conds) key << c.sizes();
    auto it = slot.emplace(key.str(), groups.size()).first;
    if (it->second == groups.size()) groups.emplace_back();
    groups[it->second].push_back(&s);
  }
  return groups;
}

std::vector<at::Tensor> block_major_loss_sums(const FluxConfig& cfg, BlockWeights& weights, const LoraSet* lora,
                                              const std::vector<FluxInputs>& inputs,
                                              const std::vector<at::Tensor>& targets, bool gradient_checkpointing) {
  check_input(inputs.size() == targets.size(), "block-major loss: one target per input");
  ForwardOptions fo;
  fo.gradient_checkpointing = gradient_checkpointing;
  const std::vector<at::Tensor> preds = flux_forward_block_major(cfg, weights, lora, inputs, fo);
  std::vector<at::Tensor> sums;
  for (size_t j = 0; j < preds.size(); ++j) sums.push_back(per_sample_mse(preds[j], targets[j]).sum());
  return sums;
}

void check_block_major_accumulation(const RunConfig& cfg, const OnlineEncoding& online) {
  if (!cfg.train.block_major_accumulation) return;
  if (online.encoder_process && online.trains_text_encoder)
    throw Error("--block_major_accumulation with --train_text_encoder / --train_text_encoder_one_only under mpirun: "
                "not supported (the encoder process takes each micro-batch's text gradients back before the next "
                "one); drop one of them");
}

// A member of Trainer (declared in trainer.h) so that it prepares inputs exactly as the
// ordinary step does; empty when the ordinary order applies.
std::vector<double> Trainer::accumulate_block_major(const std::vector<Batch>& micro_batches) {
  if (!cfg_.train.block_major_accumulation || micro_batches.size() < 2) return {};
  const size_t k = micro_batches.size();
  // The samples stay alive (and in place) until end_online: the conditioner knows them by address.
  std::vector<std::vector<Sample>> samples(k);
  std::vector<FluxInputs> inputs;
  std::vector<at::Tensor> targets;
  std::vector<size_t> owner;  // [input]: its micro-batch
  for (size_t m = 0; m < k; ++m) {
    samples[m] = micro_batches[m].samples;
    begin_online(samples[m], true);
    // Inputs are read from the conditioner now, before the next micro-batch's begin_online.
    for (const auto& g : shape_groups(samples[m])) {
      at::Tensor target;
      inputs.push_back(group_inputs(g, static_cast<uint64_t>(micro_batches[m].epoch), false, &target));
      targets.push_back(target);
      owner.push_back(m);
    }
  }
  const std::vector<at::Tensor> sums =
      block_major_loss_sums(model_cfg_, *weights_, &lora_, inputs, targets, cfg_.model.gradient_checkpointing);

  std::vector<double> loss(k, 0.0);
  at::Tensor total;
  bool finite = true;
  for (size_t j = 0; j < sums.size(); ++j) {
    const double v = sums[j].item<double>();
    const size_t m = owner[j];
    loss[m] += v;
    finite = finite && std::isfinite(v);
    // accumulate()'s scaling: grad_scale (1 / k) over the micro-batch's sample count.
    const at::Tensor scaled = sums[j] * ((1.0 / static_cast<double>(k)) / static_cast<double>(samples[m].size()));
    total = total.defined() ? total + scaled : scaled;
  }
  // Under mpirun, forward and backward hold collectives: every rank runs the backward.
  if (grad_sync_) grad_sync_->set_enabled(true);  // the window's only (so last) backward averages
  if (finite || rt_.ctl_comm) total.backward();
  for (size_t m = 0; m < k; ++m) end_online();
  for (size_t m = 0; m < k; ++m)
    loss[m] = std::isfinite(loss[m]) ? loss[m] / static_cast<double>(samples[m].size())
                                     : std::numeric_limits<double>::quiet_NaN();
  return loss;
}

}  // namespace fluxtrain
