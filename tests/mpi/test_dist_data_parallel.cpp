// Data-parallel LoRA training with the dist/ pieces put together (sharded frozen weights,
// trainer's data order, bucketed gradient averaging with overlap, the trainer's clipping and AdamW,
// or the sharded AdamW): N ranks x local batch 1 for several steps give the same LoRA weights as one
// process with global batch N on resident weights (float64, 1e-10). The training loop here is a
// minimal stand-in for the trainer: loss = mean squared error of the prediction to a per-sample
// target, every input drawn from the sample index.
#include "data/dataset.h"
#include "dist/grad_sync.h"
#include "dist/sharded_weights.h"
#include "train/optimizer.h"
#include "model/flux_transformer.h"
#include "model/flux_weights.h"
#include "model/position_ids.h"
#include "tests/mpi/dist_test_util.h"

namespace fluxtrain::dist::testing {
namespace {

const auto kF64 = at::TensorOptions().dtype(at::kDouble);
constexpr int64_t kNoise = 3, kText = 4, kSamples = 12;

struct Sample {
  at::Tensor img, txt, y, t, cond, target;
};

Sample sample(const FluxConfig& cfg, int64_t index) {
  auto gen = at::detail::createCPUGenerator(31337 + index);
  Sample s;
  s.img = at::randn({1, kNoise * kNoise, cfg.in_channels}, gen, kF64);
  s.txt = at::randn({1, kText, cfg.context_in_dim}, gen, kF64);
  s.y = at::randn({1, cfg.vec_in_dim}, gen, kF64);
  s.t = at::rand({1}, gen, kF64);
  s.cond = at::randn({1, 4, cfg.in_channels}, gen, kF64);
  s.target = at::randn({1, kNoise * kNoise, cfg.out_channels}, gen, kF64);
  return s;
}

std::pair<FluxInputs, at::Tensor> batch(const FluxConfig& cfg, const std::vector<int64_t>& indices) {
  std::vector<at::Tensor> img, txt, y, t, cond, target;
  for (int64_t i : indices) {
    Sample s = sample(cfg, i);
    img.push_back(s.img), txt.push_back(s.txt), y.push_back(s.y), t.push_back(s.t), cond.push_back(s.cond);
    target.push_back(s.target);
  }
  FluxInputs in;
  in.img = at::cat(img), in.txt = at::cat(txt), in.y = at::cat(y), in.timesteps = at::cat(t);
  in.img_ids = noise_position_ids(kNoise, kNoise);
  in.txt_ids = text_position_ids(kText);
  in.guidance = at::full({static_cast<int64_t>(indices.size())}, 3.5, kF64);
  in.cond = {at::cat(cond)};
  in.cond_ids = {subject_position_ids(2, 2)};
  return {in, at::cat(target)};
}

LoraSet make_lora(const FluxConfig& cfg) {
  LoraConfig lc;
  lc.lora_num = 1;
  lc.ranks = {4};
  lc.alphas = {4.0};
  LoraSet s = LoraSet::create(cfg, lc, 5, at::kDouble);
  auto gen = at::detail::createCPUGenerator(6);
  at::NoGradGuard ng;
  for (auto& a : s.adapters()) a.up.copy_(at::randn(a.up.sizes(), gen, kF64) * 0.1);
  return s;
}

constexpr double kLr = 1e-2, kMaxNorm = 0.05;  // small max norm: clipping is active

AdamWConfig adamw_config() {
  AdamWConfig c;
  c.weight_decay = 0.01;
  return c;
}

// One process, global batch N, resident weights, torch AdamW.
std::vector<at::Tensor> train_single(const FluxConfig& cfg, const TensorMap& full, int world, int steps, bool ckpt) {
  ResidentBlockWeights w(full, cfg.depth, cfg.depth_single);
  LoraSet lora = make_lora(cfg);
  auto params = lora.parameters();
  auto opt = make_adamw({{"lora", params}}, adamw_config());
  DataOrder order(kSamples, world, 0, 1, 2024);  // the trainer's data order, one rank, batch N
  ForwardOptions fo;
  fo.gradient_checkpointing = ckpt;
  for (int s = 0; s < steps; ++s) {
    auto [in, target] = batch(cfg, order.indices(s));
    for (auto& p : params) p.mutable_grad().reset();
    (flux_forward(cfg, w, &lora, in, fo) - target).pow(2).mean().backward();
    opt->step(kLr, kMaxNorm);
  }
  std::vector<at::Tensor> out;
  for (auto& p : params) out.push_back(p.detach().clone());
  return out;
}

// This rank's part of the global batch, sharded weights, gradients averaged over ranks.
std::vector<at::Tensor> train_distributed(const FluxConfig& cfg, const TensorMap& full, int steps, bool ckpt,
                                          bool shard_optimizer) {
  Communicator& c = comm();
  ResidentBlockWeights all(full, cfg.depth, cfg.depth_single);
  auto weight_comm = ProcessGroup::init().make_communicator(at::kCPU);
  auto grad_comm = ProcessGroup::init().make_communicator(at::kCPU);
  ShardedBlockWeights w(*weight_comm, all.globals(), all.blocks(), {});
  LoraSet lora = make_lora(cfg);
  auto params = lora.parameters();
  std::unique_ptr<GradSync> sync;
  std::unique_ptr<fluxtrain::Optimizer> opt;
  if (shard_optimizer) {
    opt = make_sharded_adamw(*grad_comm, {{"lora", params}}, adamw_config());
  } else {
    sync = std::make_unique<GradSync>(*grad_comm, params, GradSyncOptions{4096, true});
    opt = make_adamw({{"lora", params}}, adamw_config());
  }
  DataOrder order(kSamples, 1, c.rank(), c.size(), 2024);  // this rank's sample of each global batch
  ForwardOptions fo;
  fo.gradient_checkpointing = ckpt;
  for (int s = 0; s < steps; ++s) {
    auto [in, target] = batch(cfg, order.indices(s));
    for (auto& p : params) p.mutable_grad().reset();
    (flux_forward(cfg, w, &lora, in, fo) - target).pow(2).mean().backward();
    if (sync) sync->finish();
    opt->step(kLr, kMaxNorm);
  }
  std::vector<at::Tensor> out;
  for (auto& p : params) out.push_back(p.detach().clone());
  return out;
}

void compare(bool ckpt, bool shard_optimizer) {
  const FluxConfig cfg = FluxConfig::preset("tiny");
  const TensorMap full = init_random_weights(cfg, 21, at::kDouble);
  const int steps = static_cast<int>(kSamples / comm().size()) + 1;  // crosses an epoch end
  std::vector<at::Tensor> want = train_single(cfg, full, comm().size(), steps, ckpt);
  std::vector<at::Tensor> got = train_distributed(cfg, full, steps, ckpt, shard_optimizer);
  LoraSet init = make_lora(cfg);
  auto p0 = init.parameters();
  ASSERT_EQ(got.size(), want.size());
  double moved = 0;
  for (size_t k = 0; k < want.size(); ++k) {
    const double scale = want[k].abs().max().item<double>();
    EXPECT_TRUE(close(got[k], want[k], 0, 1e-10 * scale)) << "LoRA tensor " << k;
    moved = std::max(moved, (want[k] - p0[k].detach()).abs().max().item<double>());
    at::Tensor all = comm().all_gather(got[k].contiguous());
    for (int r = 0; r < comm().size(); ++r) EXPECT_TRUE(bit_equal(all[r], got[k])) << "ranks disagree on " << k;
  }
  EXPECT_GT(moved, 1e-3) << "training did not change the LoRA weights: the comparison would be vacuous";
}

TEST(DistDataParallel, RanksTimesLocalBatchEqualsOneProcessWithGlobalBatch) { compare(false, false); }
TEST(DistDataParallel, WithCheckpointing) { compare(true, false); }
TEST(DistDataParallel, WithShardedOptimizer) { compare(false, true); }

}  // namespace
}  // namespace fluxtrain::dist::testing
