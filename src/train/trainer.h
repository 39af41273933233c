// The training loop: data -> flux_forward -> flow-matching loss -> backward -> accumulate ->
// clip -> AdamW -> schedule -> metrics / validation / checkpoints.
//
// Construction loads and checks everything (config, dataset, model, LoRA, resume checkpoint) and
// writes nothing, so that bad input fails before the output directory is touched. run() creates
// the output directory and trains.
//
// Loss of a micro-batch = mean over its samples of the per-sample MSE; the update's gradient is the
// mean over the accumulated micro-batches. Samples of different latent sizes in one micro-batch
// go through the model in groups of equal shape; the result is the same as one big batch would be.
// A non-finite loss or gradient norm skips the update (the data is consumed, the step and the
// learning-rate schedule do not advance); --max_nonfinite_steps such updates in a row stop the run.
#pragma once
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "data/dataset.h"
#include "model/block_weights.h"
#include "model/flux_config.h"
#include "model/flux_transformer.h"
#include "core/tensorboard.h"
#include "model/lora.h"
#include "train/checkpoint.h"
#include "train/conditioning.h"
#include "train/encoder_process.h"
#include "train/lr_schedule.h"
#include "train/optimizer.h"
#include "train/run_config.h"
#include "train/setup.h"
#include "train/timestep_sampling.h"

namespace fluxtrain {

namespace dist {
class GradSync;
}  // namespace dist
class StepGraphs;
class TextEncoders;
class ValidationImages;

struct TrainerOptions {
  // Overrides --mixed_precision (tests use float64). Undefined = from the config.
  at::ScalarType compute_dtype = at::ScalarType::Undefined;
  // This process's place in the data-parallel job. With world_size > 1 (or --shard_weights /
  // --shard_optimizer) training needs dist::ProcessGroup::init() first and must equal its
  // rank/world; without an initialised group only accumulate() and friends work (unit tests).
  int rank = 0, world_size = 1;
  // CUDA device this rank drives (from ProcessGroup::select_cuda_device); -1: cuda:0.
  int cuda_device = -1;
  std::FILE* log = stderr;
  int tty = -1;                  // progress bar: -1 detect, 0 plain lines, 1 bar
};

struct StepResult {
  double loss = 0;       // mean over the update's samples
  double grad_norm = 0;  // before clipping
  double lr = 0;
  bool skipped = false;
  double data_wait_ms = 0;  // time train_step() waited for its micro-batches from the prefetch
};

class Trainer {
 public:
  explicit Trainer(const RunConfig& cfg, const TrainerOptions& opt = {});
  ~Trainer();

  // Trains to max_train_steps with checkpoints, metrics and the final LoRA file. Returns the
  // path of the LoRA .safetensors it wrote.
  std::string run();

  // Pieces of run(), public for tests.
  // Forward + backward of one micro-batch; gradients are added to the LoRA parameters' .grad()
  // scaled by grad_scale. Returns the micro-batch's mean loss.
  double accumulate(const Batch& batch, double grad_scale);
  // One update from the data stream (reads gradient_accumulation_steps micro-batches).
  StepResult train_step();
  // One update from the given micro-batches (the data stream is not touched). Feeding the same
  // batch again repeats its draws (they depend on epoch and sample index): an overfit test.
  StepResult train_step_on(const std::vector<Batch>& micro_batches);
  // Mean loss over the first --validation_samples samples with fixed draws, no gradients.
  // Collective when distributed: call on every rank; each rank computes its share.
  double validation_loss();
  // Snapshot of the current state for a checkpoint. Collective with --shard_optimizer (the
  // sharded AdamW state is gathered): call it on every rank.
  Checkpoint make_checkpoint() const;
  // Samples per global micro-batch: train_batch_size x world_size.
  int64_t global_batch() const { return cfg_.data.train_batch_size * opt_.world_size; }
  bool is_root() const { return opt_.rank == 0; }

  // An image into TensorBoard at `step` (validation images): [H, W, 3] uint8, PNG-encoded.
  // Root rank with --report_to tensorboard, during run(); a no-op otherwise (safe on every rank).
  void add_image(const std::string& tag, int64_t step, const at::Tensor& hwc_u8);

  const RunConfig& config() const { return cfg_; }
  const FluxConfig& model_config() const { return model_cfg_; }
  LoraSet& lora() { return lora_; }
  const TrainState& state() const { return state_; }
  // How updates run: "device update, CUDA graphs", "device update, eager (<why>)" or "host update".
  const std::string& step_mode() const { return step_mode_; }
  int64_t max_train_steps() const { return max_steps_; }
  int64_t updates_per_epoch() const { return updates_per_epoch_; }
  const std::string& resumed_from() const { return resumed_from_; }
  const Dataset& dataset() const { return *dataset_; }
  BlockWeights& block_weights() { return *weights_; }  // the frozen weights' provider stack
  at::ScalarType compute_dtype() const { return rt_.dtype; }
  // The text encoders on this rank (null when the run encodes no captions, or on a rank other
  // than --encoder_process under mpirun).
  TextEncoders* text_encoders() { return online_.text_encoders; }

 private:
  RunConfig cfg_;
  TrainerOptions opt_;
  // Device, precision and communicators (train/setup.h). Declared before the objects that hold
  // references to the communicators, so that it is destroyed after them.
  Runtime rt_;
  std::unique_ptr<Dataset> dataset_;
  FluxConfig model_cfg_;
  std::unique_ptr<BlockWeights> weights_;  // chosen by make_block_weights
  std::string weights_description_;        // the low-memory plan, for the log
  bool sharded_weights_ = false;           // frozen blocks sharded over the ranks (start line)
  // Text conditioning and online latents: cached, encoded here, or on --encoder_process.
  OnlineEncoding online_;
  std::unique_ptr<ValidationImages> validation_images_;  // --validation_prompt (train/validation.h)
  LoraSet lora_;
  std::unique_ptr<Optimizer> optimizer_;   // replicated or sharded (--shard_optimizer)
  std::vector<at::Tensor> all_params_;     // every trained tensor, over all parameter groups
  std::unique_ptr<dist::GradSync> grad_sync_;  // replicated optimizer on several ranks
  std::unique_ptr<DataOrder> order_;
  std::unique_ptr<Prefetcher> prefetch_;
  LrSchedule schedule_;
  TimestepSampler sampler_;
  TrainState state_;
  int64_t max_steps_ = 0, updates_per_epoch_ = 0;
  std::string resumed_from_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;  // root rank, --report_to tensorboard, in run()

  // The single-process step (train/trainer_device_step.cpp): the update on the device with one
  // host synchronisation per update, micro-steps and update optionally replayed as CUDA graphs.
  // Used when this process alone holds every gradient (no collectives in the step).
  struct DeviceStepState {
    at::Tensor lr;     // 0-dim, the parameters' device: the schedule's rate for this update
    at::Tensor skip;   // 0-dim float: 1 = skip this update whatever the norm (test hook)
    at::Tensor loss;   // 0-dim float64: the update's mean loss, accumulated by the micro-steps
    at::Tensor stats;  // [3] float64: loss, gradient norm, applied (1) or skipped (0)
    struct Group {     // a captured micro-step's inputs (one per shape of samples)
      FluxInputs in;
      at::Tensor target, scale;
    };
    std::map<std::string, std::unique_ptr<Group>> groups;
  };
  std::unique_ptr<DeviceStepState> device_step_;
  std::unique_ptr<StepGraphs> graphs_;
  std::string step_mode_;
  void setup_step_mode();
  StepResult train_step_device(const std::vector<Batch>& micro_batches);
  void micro_step_device(const Batch& batch, double grad_scale);
  // Runs fn as the CUDA graph `key` where graphs are on, else eagerly; a failed capture turns
  // graphs off for the rest of the run (with the reason in the log) and runs fn eagerly.
  void run_piece(const std::string& key, const std::function<void()>& fn);

  Batch next_batch(double* waited_s = nullptr);
  // Encodes what the dataset lacks (latents, text states) for one micro-batch, and afterwards
  // returns the text states' gradients. Collective under mpirun: every rank calls both once per
  // micro-batch, in order (accumulate computes every micro-batch there, even a non-finite one).
  void begin_online(std::vector<Sample>& samples, bool training);
  void end_online();
  // The transformer's inputs of equally shaped samples (their draws) and the flow target, in two
  // halves: what the host computes (noise and timestep draws, packing, cached text; CPU tensors,
  // page-locked with `pin`; thread-safe: the prefetch thread runs it) and the copies to the
  // device. `prepared`: the host half computed ahead (prepared_inputs), else computed here.
  struct HostInputs {
    FluxInputs in;            // CPU; txt, txt_ids, y undefined unless has_text
    at::Tensor target;        // CPU
    bool has_text = false;    // the conditioner gave the text on the host (cached embeddings)
    bool pinned = false;
  };
  HostInputs host_group_inputs(const std::vector<const Sample*>& group, uint64_t epoch, bool validation,
                               bool pin) const;
  FluxInputs group_inputs(const std::vector<const Sample*>& group, uint64_t epoch, bool validation,
                          at::Tensor* target, const HostInputs* prepared = nullptr);
  // The prefetch thread's host inputs of shape group `group` of the batch (shape_groups order),
  // or nullptr when the batch came without them.
  const HostInputs* prepared_inputs(const Batch& batch, size_t group) const;
  // Loss (sum over the samples, as a tensor with graph) of equally shaped samples.
  at::Tensor group_loss_sum(const std::vector<const Sample*>& group, uint64_t epoch, bool validation,
                            const HostInputs* prepared = nullptr);
  // --block_major_accumulation (train/block_major_step.cpp): forward and backward of every
  // micro-batch at once, block by block; each micro-batch's mean loss. Empty when the flag is
  // off or there is one micro-batch: then accumulate() runs them one by one.
  std::vector<double> accumulate_block_major(const std::vector<Batch>& micro_batches);
};

}  // namespace fluxtrain
