#include "train/trainer.h"

#include <algorithm>
#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/autograd.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/rng.h"
#include "dist/communicator.h"
#include "dist/grad_sync.h"
#include "dist/process_group.h"
#include "dist/sharded_weights.h"
#include "core/safetensors.h"
#include "data/image_io.h"
#include "model/flux_transformer.h"
#include "model/flux_weights.h"
#include "model/lora_io.h"
#include "model/position_ids.h"
#include "model/recompute.h"
#include "train/flow_matching.h"
#include "train/memory_estimate.h"
#include "train/block_major_step.h"
#include "train/encoder_process_optimizer.h"
#include "train/text_conditioning.h"
#include "train/train_step.h"
#include "train/step_graphs.h"
#include "train/validation.h"
#include "core/progress.h"
#include "train/output_dir.h"

namespace fluxtrain {
namespace {

// Validation draws use an epoch number no training run reaches, so they never coincide with a
// training draw and stay fixed for the whole run.
constexpr uint64_t kValidationEpoch = std::numeric_limits<uint64_t>::max();

}  // namespace

Trainer::Trainer(const RunConfig& cfg, const TrainerOptions& opt) : cfg_(cfg), opt_(opt) {
  cfg_.validate();
  if (cfg_.train.num_threads > 0) at::set_num_threads(static_cast<int>(cfg_.train.num_threads));

  // Device, precision and communicators (collective: the same order on every rank).
  if (cfg_.dist.encoder_rank >= opt.world_size)
    throw Error("--encoder_process " + std::to_string(cfg_.dist.encoder_rank) + ": the job has " +
                std::to_string(opt.world_size) + " rank(s), 0.." + std::to_string(opt.world_size - 1));
  const bool sharding = cfg_.dist.shard_weights || cfg_.dist.shard_optimizer;
  RuntimeRequest rq;
  rq.device = cfg_.model.device;
  rq.dtype = opt.compute_dtype != at::ScalarType::Undefined ? opt.compute_dtype
             : cfg_.debug.float64                           ? at::kDouble
             : cfg_.model.mixed_precision == "bf16"         ? at::kBFloat16
                                                            : at::kFloat;
  rq.rank = opt.rank;
  rq.world_size = opt.world_size;
  rq.cuda_device = opt.cuda_device;
  // Without an initialised process group (unit tests of accumulate()) several ranks run alone.
  rq.distributed = sharding || (opt.world_size > 1 && dist::ProcessGroup::initialized());
  rq.nccl_timeout = cfg_.dist.nccl_timeout;
  rq.streamed_weights = cfg_.low_memory.streams();
  rt_ = make_runtime(rq);

  // Dataset first: it is cheap to open and the most common source of mistakes.
  dataset_ = std::make_unique<Dataset>(cfg_.data.train_data);

  // Opening checks every key and shape but reads no tensor data: the weights are read by the
  // provider, block by block for a sharded run, so that no rank ever holds the full model in
  // host memory. Sharded: blocks come in the file's dtype and only this rank's slice is cast.
  WeightsPlan plan;
  plan.sharded = rt_.weights_comm && (opt.world_size > 1 || cfg_.dist.shard_weights);
  sharded_weights_ = plan.sharded;
  TransformerSource source;
  try {
    source = open_transformer(cfg_.model.pretrained_model_name_or_path, cfg_.model.model_layout,
                              plan.sharded ? at::ScalarType::Undefined : rt_.dtype);
  } catch (...) {
    rethrow_with_context("--pretrained_model_name_or_path");
  }
  model_cfg_ = source.config;
  // The run encodes what the dataset lacks (captions, images: train/encoder_process.h), so
  // datasets without cached embeddings or latents are fine; a missing encoder fails at its load.
  dataset_->check_compatible(model_cfg_, cfg_.lora.mode == LoraMode::EasyControl ? cfg_.lora.lora_num : -1,
                             cfg_.data.noise_size, cfg_.data.cond_size, /*text_online=*/true, /*vae_online=*/true);
  plan.low_memory = cfg_.low_memory;
  // --checkpoint_attention (model/model_options.h): what checkpointed blocks keep for backward.
  const bool keep_attention = checkpoint_attention_enabled(cfg_.model.checkpoint_attention,
                                                           cfg_.low_memory.fp8() || cfg_.low_memory.streams());
  set_checkpoint_attention(keep_attention);
  WeightSource ws = weight_source(source);
  if (!cfg_.low_memory.max_gpu_memory.empty()) {
    // The budget left for weights: the estimate of everything else (src/train/memory_estimate.h).
    MemoryEstimateInput mi;
    mi.model = model_cfg_;
    mi.cond_size = cfg_.data.cond_size;
    mi.noise_size = cfg_.data.noise_size;
    mi.num_conditions = cfg_.lora.mode == LoraMode::EasyControl ? cfg_.lora.lora_num : 0;
    mi.easycontrol = cfg_.lora.mode == LoraMode::EasyControl;
    mi.lora_targets = cfg_.lora.targets;
    mi.lora_rank = cfg_.lora.ranks.empty() ? 0 : cfg_.lora.ranks[0];
    mi.batch = cfg_.data.train_batch_size;
    mi.gradient_checkpointing = cfg_.model.gradient_checkpointing;
    mi.checkpoint_attention = keep_attention;
    mi.compute_bytes = at::elementSize(rt_.dtype);
    mi.low_memory = cfg_.low_memory;
    mi.world_size = opt.world_size;
    mi.shard_weights = plan.sharded;
    // Trained text encoders share the budget (on this process unless --encoder_process is another).
    const bool encoders_here = opt.world_size == 1 || opt.rank == cfg_.dist.encoder_rank;
    mi.train_clip = encoders_here && cfg_.text_encoder.trains_clip();
    mi.train_t5 = encoders_here && cfg_.text_encoder.trains_t5();
    mi.text_encoder_rank = cfg_.text_encoder.text_encoder_rank;
    mi.txt_len = cfg_.text_encoder.max_sequence_length;
    plan.non_weight_bytes = estimate_non_weight_bytes(mi);
  }
  // Shapes without reading: the plan's byte counts (start line, budget) cost no pass over the file.
  const FluxConfig mc = model_cfg_;
  ws.block_shapes = [mc](int i) { return flux_block_shapes(mc, i); };
  weights_ = make_block_weights(rt_, ws, plan, &weights_description_);
  if (cfg_.lora.mode == LoraMode::Standard)
    for (int b : cfg_.lora.blocks)
      if (b >= model_cfg_.num_blocks())
        throw Error("--lora_blocks: block " + std::to_string(b) + " does not exist (the model has " +
                    std::to_string(model_cfg_.num_blocks()) + " blocks)");

  // Float32 masters (float64 when the whole computation is float64, for exactness tests).
  const at::ScalarType master = rt_.dtype == at::kDouble ? at::kDouble : at::kFloat;
  // Text encoders and the autoencoder where the dataset lacks embeddings or latents, or a
  // text-encoder LoRA trains; neither: no encoder is loaded.
  online_ = make_online_encoding(cfg_, rt_, dataset_->info(), master);
  check_block_major_accumulation(cfg_, online_);  // train/block_major_step.h
  lora_ = LoraSet::create(model_cfg_, cfg_.lora, derive_seed(cfg_.train.seed, RngPurpose::LoraInit, 0, 0), master);
  if (!cfg_.lora.pretrained_lora_path.empty()) {
    // EasyControl's --pretrained_lora_path: the adapters start from a file (a resume below still
    // overrides them with the checkpoint's).
    const std::string& f = cfg_.lora.pretrained_lora_path;
    try {
      check_input(path_exists(f), f + ": missing");
      const LoraSet from = load_lora_file(f, model_cfg_, cfg_.lora.alphas);
      TensorMap w;
      for (const auto& kv : from.state()) w.emplace(kv.first, kv.second.to(master));
      lora_.load_state(w, f);
      // Same keys and shapes but another alpha would change what the adapters compute.
      for (size_t i = 0; i < from.adapters().size() && i < lora_.adapters().size(); ++i)
        if (std::abs(from.adapters()[i].scale - lora_.adapters()[i].scale) > 1e-12 * std::abs(lora_.adapters()[i].scale))
          throw Error(f + ": its alpha/rank is " + std::to_string(from.adapters()[i].scale) + " (" +
                      from.adapters()[i].key + "), the run's --network_alphas give " +
                      std::to_string(lora_.adapters()[i].scale));
    } catch (...) {
      rethrow_with_context("--pretrained_lora_path");
    }
  }
  lora_.to(at::TensorOptions().device(rt_.device).dtype(master));

  order_ = std::make_unique<DataOrder>(
      DataOrder::for_dataset(*dataset_, cfg_.data.train_batch_size, opt.rank, opt.world_size, cfg_.train.seed));
  const int64_t accum = cfg_.train.gradient_accumulation_steps;
  updates_per_epoch_ = (order_->micro_batches_per_epoch() + accum - 1) / accum;
  max_steps_ = cfg_.train.max_train_steps > 0 ? cfg_.train.max_train_steps
                                              : cfg_.train.num_train_epochs * updates_per_epoch_;
  schedule_.kind = cfg_.train.lr_scheduler;
  schedule_.base_lr = cfg_.train.learning_rate;
  schedule_.warmup_steps = cfg_.train.lr_warmup_steps;
  schedule_.total_steps = max_steps_;
  if ((schedule_.kind == "linear" || schedule_.kind == "cosine") && schedule_.warmup_steps >= max_steps_)
    throw Error("--lr_warmup_steps " + std::to_string(schedule_.warmup_steps) + " must be below the " +
                std::to_string(max_steps_) + " training steps for --lr_scheduler " + schedule_.kind);
  sampler_ = TimestepSampler::from_config(cfg_.train);
  state_.seed = cfg_.train.seed;
  state_.global_batch = global_batch();

  AdamWConfig ac;
  ac.beta1 = cfg_.train.adam_beta1;
  ac.beta2 = cfg_.train.adam_beta2;
  ac.eps = cfg_.train.adam_epsilon;
  ac.weight_decay = cfg_.train.adam_weight_decay;
  std::vector<ParamGroup> groups{{"transformer", lora_.parameters(), 1.0}};
  for (auto& g : online_.conditioner->param_groups()) groups.push_back(g);
  all_params_ = all_params(groups);
  if (cfg_.dist.shard_optimizer) {
    optimizer_ = make_sharded_adamw(*rt_.grad_comm, groups, ac);
  } else {
    optimizer_ = make_adamw(groups, ac);
    if (rt_.grad_comm && opt.world_size > 1)
      grad_sync_ = std::make_unique<dist::GradSync>(*rt_.grad_comm, all_params_);
  }
  if (online_.encoder_process) {
    // The text-encoder LoRA on --encoder_process: its own AdamW there, outside GradSync, one
    // clipping norm with the transformer's (train/encoder_process_optimizer.h).
    for (const auto& p : all_params(online_.encoder_process_groups)) all_params_.push_back(p);
    optimizer_ = make_encoder_process_optimizer(*rt_.ctl_comm, static_cast<int>(cfg_.dist.encoder_rank),
                                                std::move(optimizer_), lora_.parameters().size(),
                                                online_.encoder_process_groups, ac);
  }

  // Resume (still before anything is written).
  const std::string& r = cfg_.checkpoint.resume_from_checkpoint;
  std::string path = r == "latest" ? latest_checkpoint(cfg_.checkpoint.output_dir) : r;
  if (!path.empty()) {
    Checkpoint ck;
    try {
      ck = load_checkpoint(path);
    } catch (...) {
      rethrow_with_context("--resume_from_checkpoint");
    }
    // Text-encoder LoRA weights ride in the same map under "text_encoder*" keys.
    TensorMap te_state;
    for (auto it = ck.lora.begin(); it != ck.lora.end();) {
      if (it->first.rfind("text_encoder", 0) == 0) {
        te_state.emplace(it->first, it->second);
        it = ck.lora.erase(it);
      } else {
        ++it;
      }
    }
    check_checkpoint_matches(ck, path, model_cfg_, lora_);
    check_resume_step(path, ck.state.step, max_steps_);  // resuming at/past the end: an error
    if (!online_.trains_text_encoder && !te_state.empty())
      throw Error(path + ": checkpoint has text-encoder LoRA weights; resume with the same --train_text_encoder mode");
    if (online_.trains_text_encoder && online_.text_encoders) {  // under mpirun: the encoder process
      TensorMap tw;
      for (const auto& kv : te_state) tw.emplace(kv.first, kv.second.to(master));
      online_.text_encoders->load_lora_state(tw, path);
    }
    // The data stream counts global micro-batches: it continues on M ranks only with the global
    // batch of the run that wrote it. Older checkpoints (no attribute) were written by one rank.
    int64_t ck_global = ck.state.global_batch;
    if (ck_global <= 0 && ck.config.contains("data") && ck.config["data"].contains("train_batch_size"))
      ck_global = ck.config["data"]["train_batch_size"].get<int64_t>();
    if (ck_global > 0 && ck_global != global_batch()) {
      const int64_t w = opt.world_size;
      throw Error("--resume_from_checkpoint " + path + ": written with a global batch of " + std::to_string(ck_global) +
                  " samples, but --train_batch_size " + std::to_string(cfg_.data.train_batch_size) + " x " +
                  std::to_string(w) + " rank(s) = " + std::to_string(global_batch()) +
                  (ck_global % w == 0 ? " (use --train_batch_size " + std::to_string(ck_global / w) + ")"
                                      : " (" + std::to_string(ck_global) + " is not divisible by " + std::to_string(w) +
                                            " ranks)"));
    }
    if (cfg_.train.seed_given && ck.state.seed != cfg_.train.seed)
      throw Error("--seed " + std::to_string(cfg_.train.seed) + " differs from the seed " +
                  std::to_string(ck.state.seed) + " of " + path + " (omit --seed to continue that run)");
    // The checkpoint's seed wins: the data order and every draw continue where they were.
    cfg_.train.seed = ck.state.seed;
    cfg_.train.seed_given = true;
    order_ = std::make_unique<DataOrder>(
      DataOrder::for_dataset(*dataset_, cfg_.data.train_batch_size, opt.rank, opt.world_size, cfg_.train.seed));
    TensorMap lw;
    for (const auto& kv : ck.lora) lw.emplace(kv.first, kv.second.to(master));
    lora_.load_state(lw, path);
    TensorMap os;
    for (const auto& kv : ck.optimizer) os.emplace(kv.first, kv.second.to(rt_.device).to(master));
    optimizer_->load_state(os, ck.state.optimizer_steps, path);
    state_ = ck.state;
    state_.global_batch = global_batch();
    resumed_from_ = path;
  }
  // Validation images (collective: every rank, after resume so that the text-encoder LoRA is the
  // resumed one). Loads nothing without --validation_prompt.
  {
    ValidationImages::Context vc;
    vc.cfg = &cfg_;
    vc.model = &model_cfg_;
    vc.rt = &rt_;
    vc.rank = opt.rank;
    vc.world_size = opt.world_size;
    vc.text = online_.text_encoders;
    vc.run_has_text = cfg_.text_encoder.needs_encoders() || !dataset_->info().has_text_embeddings;
    vc.text_trains = online_.trains_text_encoder;
    vc.text_rank = opt.world_size > 1 ? static_cast<int>(cfg_.dist.encoder_rank) : 0;
    validation_images_ = std::make_unique<ValidationImages>(vc);
  }
  setup_step_mode();
}

Trainer::~Trainer() {
  // The prefetch thread's hook reads members declared after prefetch_ (sampler_): stop it first.
  prefetch_.reset();
}

Batch Trainer::next_batch(double* waited_s) {
  if (!prefetch_) {
    // With cached latents, the noise draws, packing (and on CUDA page-locking) of each
    // micro-batch happen on the prefetch thread while the step before it runs; the step itself
    // only issues (asynchronous) copies. Issue 15: on the H200 this host work had cost 25-65 ms
    // per update, with the GPU idle.
    // FLUXTRAIN_PREPARE_ON_STEP=1 keeps it on the training thread (a check that both give the
    // same bits: tests/py/test_train_cuda_graph.py).
    Prefetcher::PrepareFn prepare;
    if (!online_.latents && !std::getenv("FLUXTRAIN_PREPARE_ON_STEP")) {
      const bool cuda = rt_.device.is_cuda();
      const c10::DeviceIndex index = rt_.device.index() < 0 ? 0 : rt_.device.index();
      prepare = [this, cuda, index](Batch& b) {
        if (cuda) at::accelerator::setDeviceIndex(index);  // page-locked buffers belong to the run's GPU
        std::vector<HostInputs> inputs;
        for (const auto& g : shape_groups(b.samples))
          inputs.push_back(host_group_inputs(g, static_cast<uint64_t>(b.epoch), false, cuda));
        b.prepared = std::move(inputs);
      };
    }
    prefetch_ = std::make_unique<Prefetcher>(*dataset_, *order_, state_.micro_batch, cfg_.data.prefetch_batches,
                                             std::move(prepare));
  }
  const auto t0 = std::chrono::steady_clock::now();
  Batch b = prefetch_->next();
  if (waited_s) *waited_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (b.micro_batch != state_.micro_batch)
    throw Error("data stream out of order: expected micro-batch " + std::to_string(state_.micro_batch),
                ErrorKind::Internal);
  state_.micro_batch = b.micro_batch + 1;
  return b;
}

Trainer::HostInputs Trainer::host_group_inputs(const std::vector<const Sample*>& group, uint64_t epoch,
                                               bool validation, bool pin) const {
  const int64_t b = static_cast<int64_t>(group.size());
  const at::ScalarType dtype = rt_.dtype;
  const uint64_t seed = cfg_.train.seed;
  const uint64_t draw_epoch = validation ? kValidationEpoch : epoch;

  std::vector<at::Tensor> xs, noises;
  std::vector<double> sigmas;
  for (const Sample* s : group) {
    xs.push_back(s->target.to(at::kFloat));
    noises.push_back(sample_noise(s->target.sizes().vec(), seed, draw_epoch, static_cast<uint64_t>(s->index)));
    sigmas.push_back(sampler_.sigma_for(seed, draw_epoch, static_cast<uint64_t>(s->index)));
  }
  // Noise and sigma are drawn on the CPU in float32/float64, so every device and layout sees the
  // same values; the mix happens in float32 (float64 in float64 runs) before the cast.
  const at::ScalarType mix = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x0 = at::stack(xs).to(mix);
  const at::Tensor noise = at::stack(noises).to(mix);
  const at::Tensor sigma = at::tensor(sigmas, at::TensorOptions().dtype(at::kDouble)).to(mix);
  const at::Tensor xt = noisy_latents(x0, noise, sigma);
  const int64_t h = x0.size(2), w = x0.size(3);

  HostInputs out;
  out.target = pack_latents(flow_target(x0, noise));
  FluxInputs& in = out.in;
  in.img = pack_latents(xt).to(dtype);
  in.img_ids = noise_position_ids(h / 2, w / 2);
  TextConditioning text;
  out.has_text = online_.conditioner->host_text(group, dtype, &text);
  if (out.has_text) {
    in.txt = text.prompt_embeds;
    in.txt_ids = text_position_ids(in.txt.size(1));
    in.y = text.pooled;
  }
  in.timesteps = sigma;
  in.guidance = at::full({b}, cfg_.model.guidance_scale, at::TensorOptions().dtype(mix));
  const auto& kinds = dataset_->info().cond_kinds;
  for (size_t k = 0; k < kinds.size(); ++k) {
    std::vector<at::Tensor> cs;
    for (const Sample* s : group) cs.push_back(s->conds[k].to(mix));
    const at::Tensor c = at::stack(cs);
    const int64_t ch = c.size(2), cw = c.size(3);
    in.cond.push_back(pack_latents(c).to(dtype));
    in.cond_ids.push_back(kinds[k] == "subject" ? subject_position_ids(ch / 2, cw / 2)
                                                : spatial_position_ids(ch / 2, cw / 2, h / 2, w / 2));
  }
  if (pin) {
    // Page-locked, so that the step's copies are asynchronous (the caching host allocator
    // reuses a buffer only after the copy that read it has run).
    auto p = [](at::Tensor& t) {
      if (t.defined()) t = t.contiguous().pin_memory();
    };
    p(out.target);
    for (at::Tensor* t : {&in.img, &in.img_ids, &in.txt, &in.txt_ids, &in.y, &in.timesteps, &in.guidance}) p(*t);
    for (auto& t : in.cond) p(t);
    for (auto& t : in.cond_ids) p(t);
  }
  out.pinned = pin;
  return out;
}

FluxInputs Trainer::group_inputs(const std::vector<const Sample*>& group, uint64_t epoch, bool validation,
                                 at::Tensor* target, const HostInputs* prepared) {
  const HostInputs h = prepared ? *prepared : host_group_inputs(group, epoch, validation, false);
  const c10::Device device = rt_.device;
  const bool nb = h.pinned;  // asynchronous copies from page-locked memory
  auto dev = [&](const at::Tensor& t) { return t.defined() ? t.to(device, /*non_blocking=*/nb) : t; };
  *target = dev(h.target);
  FluxInputs in;
  in.img = dev(h.in.img);
  in.img_ids = dev(h.in.img_ids);
  if (h.has_text) {
    in.txt = dev(h.in.txt);
    in.txt_ids = dev(h.in.txt_ids);
    in.y = dev(h.in.y);
  } else {
    TextConditioning text = online_.conditioner->text(group, device, rt_.dtype, !validation);
    in.txt = text.prompt_embeds;
    in.txt_ids = text_position_ids(in.txt.size(1)).to(device);
    in.y = text.pooled;
  }
  in.timesteps = dev(h.in.timesteps);
  in.guidance = dev(h.in.guidance);
  for (const auto& c : h.in.cond) in.cond.push_back(dev(c));
  for (const auto& c : h.in.cond_ids) in.cond_ids.push_back(dev(c));
  return in;
}

const Trainer::HostInputs* Trainer::prepared_inputs(const Batch& batch, size_t group) const {
  const auto* v = std::any_cast<std::vector<HostInputs>>(&batch.prepared);
  if (!v) return nullptr;
  if (group >= v->size()) throw Error("prepared inputs: a shape group beyond the prefetch's", ErrorKind::Internal);
  return &(*v)[group];
}

at::Tensor Trainer::group_loss_sum(const std::vector<const Sample*>& group, uint64_t epoch, bool validation,
                                   const HostInputs* prepared) {
  at::Tensor target;
  const FluxInputs in = group_inputs(group, epoch, validation, &target, prepared);
  return flow_loss_sum(model_cfg_, *weights_, &lora_, in, target, cfg_.model.gradient_checkpointing && !validation);
}

void Trainer::begin_online(std::vector<Sample>& samples, bool training) {
  if (online_.latents) online_.latents->fill(samples);
  std::vector<const Sample*> ptrs;
  for (const Sample& s : samples) ptrs.push_back(&s);
  online_.conditioner->begin_batch(ptrs, training);
}

void Trainer::end_online() {
  // This rank's loss enters the update as 1/ranks of it (GradSync averages the transformer's).
  online_.conditioner->end_batch(rt_.ctl_comm ? 1.0 / opt_.world_size : 1.0);
}

double Trainer::accumulate(const Batch& batch, double grad_scale) {
  std::vector<Sample> samples = batch.samples;  // latents are filled in here for image datasets
  begin_online(samples, true);
  const std::vector<std::vector<const Sample*>> groups = shape_groups(samples);  // one forward each
  const double n = static_cast<double>(samples.size());
  // Under mpirun, forward and backward hold collectives (sharded blocks, the encoder process):
  // every rank runs every group even after a non-finite loss (the update is skipped on all ranks).
  const bool lockstep = rt_.ctl_comm != nullptr;
  double total = 0;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    at::Tensor sum = group_loss_sum(groups[gi], static_cast<uint64_t>(batch.epoch), false, prepared_inputs(batch, gi));
    const double v = sum.item<double>();
    total += v;
    if (!std::isfinite(v) && !lockstep) break;  // alone: no backward of garbage
    (sum * (grad_scale / n)).backward();
  }
  end_online();
  return std::isfinite(total) ? total / n : std::numeric_limits<double>::quiet_NaN();
}

StepResult Trainer::train_step() {
  std::vector<Batch> mbs;
  double waited = 0;
  for (int64_t a = 0; a < cfg_.train.gradient_accumulation_steps; ++a) mbs.push_back(next_batch(&waited));
  StepResult r = train_step_on(mbs);
  r.data_wait_ms = waited * 1e3;
  return r;
}

StepResult Trainer::train_step_on(const std::vector<Batch>& micro_batches) {
  if (opt_.world_size > 1 && !rt_.ctl_comm)
    throw Error("trainer: an update with world_size > 1 needs dist::ProcessGroup::init() first", ErrorKind::Internal);
  if (device_step_) return train_step_device(micro_batches);
  // The host update: gradients averaged over ranks, the norm and the skip decided on the host.
  StepResult r;
  const double accum = static_cast<double>(micro_batches.size());
  const auto params = all_params_;
  for (auto p : params) p.mutable_grad().reset();
  r.lr = schedule_.lr(state_.step);
  bool bad = false;
  double loss_sum = 0;
  // --block_major_accumulation: every micro-batch's forward and backward at once, block by
  // block (train/block_major_step.h); the loop below then only takes their losses.
  const std::vector<double> block_major = accumulate_block_major(micro_batches);
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    // Gradients stay local until the last micro-batch of the window; its backward averages them
    // over the ranks (bucket by bucket, overlapping the rest of backward).
    if (grad_sync_) grad_sync_->set_enabled(i + 1 == micro_batches.size());
    double l = block_major.empty() ? accumulate(micro_batches[i], 1.0 / accum) : block_major[i];
    // Test hook: this rank's first update at step K counts as non-finite (the others' do not),
    // from its first micro-batch on, so that the rest of the window is skipped as for real data.
    if (i == 0 && cfg_.debug.nan_at_step == state_.step && cfg_.debug.nan_rank == opt_.rank &&
        state_.nonfinite_total == 0)
      l = std::numeric_limits<double>::quiet_NaN();
    loss_sum += l;
    if (!std::isfinite(l)) {
      bad = true;
      // Alone, the rest of the update's data is consumed but not computed. Under mpirun the
      // rank keeps computing: the other ranks' forwards and backwards need its collectives.
      if (!rt_.ctl_comm) break;
    }
  }
  r.loss = bad ? std::numeric_limits<double>::quiet_NaN() : loss_sum / accum;
  if (grad_sync_) {
    // Every rank finishes the averaging, also one with a non-finite loss, so that all ranks
    // issue the same collectives (its gradients are discarded below anyway).
    grad_sync_->set_enabled(true);
    grad_sync_->finish();
  }
  if (rt_.ctl_comm) {
    // One all-reduce: the mean loss over ranks (equal local batches: the global mean) for the
    // logs, and whether any rank saw a non-finite loss, so that all ranks skip together.
    at::Tensor t = at::tensor({bad ? 0.0 : r.loss, bad ? 1.0 : 0.0}, at::TensorOptions().dtype(at::kDouble));
    rt_.ctl_comm->all_reduce(t, dist::ReduceOp::Sum);
    bad = t[1].item<double>() > 0;
    r.loss = bad ? std::numeric_limits<double>::quiet_NaN() : t[0].item<double>() / opt_.world_size;
  }
  // After the averaging the gradients are identical on every rank, so the local norm is the
  // global one and every rank reaches the same skip decision; the sharded optimizer computes
  // it from all ranks' slices. A non-finite norm leaves everything unchanged.
  if (bad) r.grad_norm = std::numeric_limits<double>::quiet_NaN();
  else r.grad_norm = optimizer_->step(r.lr, cfg_.train.max_grad_norm);
  if (bad || !std::isfinite(r.grad_norm)) {
    r.skipped = true;
    ++state_.nonfinite_in_a_row;
    ++state_.nonfinite_total;
    for (auto p : params) p.mutable_grad().reset();
    if (state_.nonfinite_in_a_row >= cfg_.train.max_nonfinite_steps)
      throw Error("stopping: " + std::to_string(state_.nonfinite_in_a_row) +
                  " updates in a row had a non-finite loss or gradient (--max_nonfinite_steps " +
                  std::to_string(cfg_.train.max_nonfinite_steps) + "; lower --learning_rate or check the data)");
    return r;
  }
  for (auto p : params) p.mutable_grad().reset();
  state_.optimizer_steps = optimizer_->steps();
  state_.nonfinite_in_a_row = 0;
  state_.lr = r.lr;
  ++state_.step;
  return r;
}

double Trainer::validation_loss() {
  at::NoGradGuard ng;
  const int64_t n = std::min(cfg_.validation.validation_samples, dataset_->size());
  if (n <= 0) return std::numeric_limits<double>::quiet_NaN();
  const int64_t world = rt_.ctl_comm ? opt_.world_size : 1, rank = rt_.ctl_comm ? opt_.rank : 0;
  // Rank r takes samples r, r + N, ...; every rank runs the same number of forwards (sharded
  // weights gather collectively), the surplus ones on a repeated sample that is not counted.
  const int64_t rounds = (n + world - 1) / world;
  double local[2] = {0, 0};  // loss sum, samples counted
  for (int64_t k = 0; k < rounds; ++k) {
    const int64_t i = k * world + rank;
    const bool counted = i < n;
    std::vector<Sample> one{dataset_->read(counted ? i : rank % n)};
    begin_online(one, false);
    const double l = group_loss_sum({&one[0]}, 0, true).item<double>();
    end_online();
    if (counted) {
      local[0] += l;
      local[1] += 1;
    }
  }
  if (world > 1) {
    at::Tensor t = at::tensor({local[0], local[1]}, at::TensorOptions().dtype(at::kDouble));
    rt_.ctl_comm->all_reduce(t, dist::ReduceOp::Sum);
    local[0] = t[0].item<double>();
    local[1] = t[1].item<double>();
  }
  return local[0] / local[1];
}

Checkpoint Trainer::make_checkpoint() const {
  Checkpoint ck;
  ck.state = state_;
  for (const auto& kv : lora_.state()) ck.lora.emplace(kv.first, kv.second.detach().cpu());
  if (online_.trains_text_encoder) {
    // Under mpirun the text-encoder LoRA lives on --encoder_process: sent to rank 0, which saves.
    TensorMap te = online_.text_encoders ? online_.text_encoders->lora_state() : TensorMap{};
    if (online_.encoder_process) te = send_to_root(*rt_.ctl_comm, static_cast<int>(cfg_.dist.encoder_rank), te);
    for (const auto& kv : te) ck.lora.emplace(kv.first, kv.second.detach().cpu());
  }
  for (const auto& kv : optimizer_->state())
    ck.optimizer.emplace(kv.first, kv.second.detach().cpu());
  ck.model = model_cfg_;
  ck.config = cfg_.to_json();
  ck.scheduler = {{"kind", schedule_.kind},
                  {"base_lr", schedule_.base_lr},
                  {"warmup_steps", schedule_.warmup_steps},
                  {"total_steps", schedule_.total_steps},
                  {"next_lr", schedule_.lr(state_.step)}};
  return ck;
}

void Trainer::add_image(const std::string& tag, int64_t step, const at::Tensor& hwc_u8) {
  if (!tensorboard_) return;
  tensorboard_->add_image_png(tag, step, encode_png(hwc_u8), hwc_u8.size(0), hwc_u8.size(1), hwc_u8.size(2));
}

std::string Trainer::run() {
  const std::string& out = cfg_.checkpoint.output_dir;
  // Rank 0 speaks and writes for the job; the other ranks compute the same steps silently.
  const bool root = is_root();
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> devnull(root ? nullptr : std::fopen("/dev/null", "w"), &std::fclose);
  if (!root && !devnull) throw Error("cannot open /dev/null");
  std::FILE* log = root ? opt_.log : devnull.get();
  if (root) make_directories(out);
  // Plain (non-terminal) output: about 50 progress lines per run.
  Progress progress(max_steps_, state_.step, log, opt_.tty, std::max<int64_t>(1, max_steps_ / 50));
  if (root) for (const auto& line : prepare_output_dir(cfg_.checkpoint)) progress.message(line);  // train/output_dir.h
  progress.message("fluxtrain train: config " + cfg_.to_json().dump());
  if (root) write_text_file_atomic(path_join(out, "config.json"), cfg_.to_json().dump(2) + "\n");
  {
    std::ostringstream ss;
    ss << "fluxtrain train: " << dataset_->size() << " samples, " << updates_per_epoch_ << " updates per epoch, "
       << max_steps_ << " updates, device " << rt_.device << ", " << c10::toString(rt_.dtype) << ", seed "
       << cfg_.train.seed;
    if (opt_.world_size > 1 || sharded_weights_)
      ss << ", " << opt_.world_size << " rank(s) x batch " << cfg_.data.train_batch_size << " (global "
         << global_batch() << ")" << (sharded_weights_ ? ", sharded weights" : "")
         << (cfg_.dist.shard_optimizer ? ", sharded optimizer" : "");
    if (!weights_description_.empty()) ss << ", " << weights_description_;
    if (!online_.description.empty()) ss << ", " << online_.description;
    if (!resumed_from_.empty()) ss << ", resumed from " << resumed_from_ << " at step " << state_.step;
    if (!rt_.device.is_cpu()) ss << ", step: " << step_mode_;
    progress.message(ss.str());
  }
  // What each rank holds of the encoders (only --encoder_process under mpirun): on the start line
  // and in the run's first metrics record.
  std::vector<int64_t> encoder_bytes;
  if (!online_.description.empty()) {
    encoder_bytes = encoder_weight_bytes_per_rank(online_, rt_.ctl_comm.get());
    progress.message(encoder_weights_per_rank(encoder_bytes));
  }
  std::unique_ptr<MetricsWriter> metrics;
  if (root) metrics = std::make_unique<MetricsWriter>(path_join(out, "metrics.jsonl"), resumed_from_.empty() ? -1 : state_.step);
  if (root && cfg_.checkpoint.report_to == "tensorboard" && !tensorboard_available())
    progress.message("fluxtrain train: no TensorBoard event files (built without protobuf); metrics.jsonl only");
  if (root && cfg_.checkpoint.report_to == "tensorboard" && tensorboard_available()) {
    // A resumed run opens a new event file in the same folder; TensorBoard merges them.
    const std::string& ld = cfg_.checkpoint.logging_dir;
    const std::string logdir = ld[0] == '/' ? ld : path_join(out, ld);
    make_directories(logdir);
    tensorboard_ = std::make_unique<TensorBoardWriter>(logdir);
    // A resumed run continues the series from the checkpoint; what a crashed run logged after it
    // is dropped by TensorBoard (SessionLog START).
    if (!resumed_from_.empty()) tensorboard_->add_session_start(state_.step + 1, resumed_from_);
  }
  // One record per update: metrics.jsonl, and its numbers as TensorBoard scalars.
  auto record = [&](const nlohmann::json& m) {
    if (metrics) metrics->write(m);
    if (!tensorboard_) return;
    std::vector<std::pair<std::string, double>> scalars;
    for (const auto& it : m.items())
      if (it.key() != "step" && it.value().is_number()) scalars.emplace_back(it.key(), it.value().get<double>());
    tensorboard_->add_scalars(state_.step, scalars);
    if (cfg_.debug.tensorboard_image) {
      // Test hook: a 24x32 pattern that depends on the step, so readers can tell images apart.
      at::Tensor img = (at::arange(24 * 32 * 3, at::kLong).reshape({24, 32, 3}) * 7 + state_.step) % 256;
      add_image("debug/pattern", state_.step, img.to(at::kByte));
    }
  };

  int64_t last_saved = resumed_from_.empty() ? -1 : state_.step;
  auto save = [&] {
    const std::string path = checkpoint_path(out, state_.step);
    const Checkpoint ck = make_checkpoint();  // collective with --shard_optimizer: every rank
    last_saved = state_.step;
    if (!root) return;
    save_checkpoint(path, ck);
    for (const auto& removed : prune_checkpoints(out, cfg_.checkpoint.checkpoints_total_limit))
      progress.message("removed old checkpoint " + removed);
    progress.message("saved " + path);
  };

  if (cfg_.validation.validation_steps > 0 && resumed_from_.empty())
    progress.message("step 0: validation loss " + std::to_string(validation_loss()));
  auto t_prev = std::chrono::steady_clock::now();
  double sps_avg = 0;
  while (state_.step < max_steps_) {
    if (cfg_.debug.fail_at_step == state_.step && cfg_.debug.fail_rank == opt_.rank)
      throw Error("injected failure at step " + std::to_string(state_.step) + " (--debug_fail_at_step)");
    const StepResult r = train_step();
    const auto now = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(now - t_prev).count();
    t_prev = now;
    sps_avg = sps_avg == 0 ? dt : 0.9 * sps_avg + 0.1 * dt;
    nlohmann::json m = {{"step", state_.step},
                        {"epoch", order_->epoch_of(std::max<int64_t>(0, state_.micro_batch - 1))},
                        {"loss", r.loss},
                        {"lr", r.lr},
                        {"grad_norm", r.grad_norm},
                        {"s_per_step", dt},
                        {"data_wait_ms", r.data_wait_ms},
                        {"skipped", r.skipped},
                        {"nonfinite_total", state_.nonfinite_total}};
    // Memory: the process's peak resident host memory, and on a GPU the caching allocator's peak.
    {
      rusage ru{};
      if (getrusage(RUSAGE_SELF, &ru) == 0) m["peak_host_rss_gib"] = static_cast<double>(ru.ru_maxrss) / (1 << 20);
      if (!rt_.device.is_cpu())
        m["peak_gpu_gib"] = static_cast<double>(at::accelerator::getDeviceStats(rt_.device.index() < 0 ? 0 : rt_.device.index())
                                                    .allocated_bytes[0].peak) / (1ull << 30);
    }
    if (r.skipped) {
      progress.message("update skipped after step " + std::to_string(state_.step) +
                       ": non-finite loss or gradient (" + std::to_string(state_.nonfinite_in_a_row) + " in a row)");
      record(m);
      continue;
    }
    const int64_t vs = cfg_.validation.validation_steps;
    if (vs > 0 && (state_.step % vs == 0 || state_.step == max_steps_)) {
      const double vl = validation_loss();
      m["val_loss"] = vl;
      progress.message("step " + std::to_string(state_.step) + ": validation loss " + std::to_string(vl));
    }
    if (!encoder_bytes.empty()) {
      m["encoder_weight_bytes_per_rank"] = encoder_bytes;
      encoder_bytes.clear();
    }
    if (validation_images_->due(state_.step, max_steps_)) {
      std::vector<std::string> written;
      const at::Tensor images = validation_images_->draw(state_.step, *weights_, lora_, &written);  // collective
      if (root) {
        m["validation_images"] = written;
        for (int64_t k = 0; k < images.size(0); ++k) add_image("validation/" + std::to_string(k), state_.step, images[k]);
        progress.message("step " + std::to_string(state_.step) + ": " + std::to_string(written.size()) +
                         " validation image(s) in " + path_join(out, "validation"));
      }
    }
    record(m);
    progress.update(state_.step, r.loss, r.lr, sps_avg);
    if (state_.step % cfg_.checkpoint.checkpointing_steps == 0 || state_.step == max_steps_) save();
  }
  if (last_saved != state_.step) save();
  progress.finish();
  const std::string lora_path = path_join(out, "lora.safetensors");
  if (online_.trains_text_encoder && online_.text_encoders) {
    // Written by the process that holds the encoders: rank 0 alone, --encoder_process under
    // mpirun. diffusers' FluxPipeline.load_lora_weights reads it for the text encoder.
    const std::string te_path = path_join(out, "text_encoder_lora.safetensors");
    online_.text_encoders->save_lora_diffusers(te_path);
    if (root) progress.message("fluxtrain train: wrote " + te_path);
  }
  // The text encoders' LoRA in kohya names, for lora_kohya.safetensors. Under mpirun it lives on
  // --encoder_process and is sent to rank 0 (every rank takes part, as in make_checkpoint).
  TensorMap te_kohya;
  const auto& formats = cfg_.lora.formats;
  if (online_.trains_text_encoder && std::find(formats.begin(), formats.end(), "kohya") != formats.end()) {
    if (online_.text_encoders) te_kohya = online_.text_encoders->lora_state_kohya();
    if (online_.encoder_process) te_kohya = send_to_root(*rt_.ctl_comm, static_cast<int>(cfg_.dist.encoder_rank), te_kohya);
  }
  if (root) {
    // lora.safetensors (native format) plus one file per other --lora_format; atomic writes.
    for (const auto& p : save_lora_files(out, lora_, formats, te_kohya))
      if (p != lora_path) progress.message("fluxtrain train: wrote " + p);
    if (cfg_.debug.save_masters) {
      // The LoRA file is float32; exactness tests compare the float64 masters themselves.
      TensorMap m;
      for (const auto& kv : lora_.state()) m.emplace(kv.first, kv.second.detach().cpu().contiguous());
      safetensors::save(path_join(out, "lora_masters.safetensors"), m);
    }
  }
  progress.message("fluxtrain train: wrote " + lora_path);
  return lora_path;
}

}  // namespace fluxtrain
