// Options of the training loop itself: optimisation, learning-rate schedule, timestep sampling,
// checkpoints, validation and the hidden test hooks. The parts' own
// options live with them (model/model_options.h, model/lora.h, data/data_options.h,
// dist/dist_options.h); train/run_config.h puts them together for `fluxtrain train`.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace fluxtrain {

class OptionSet;

struct TrainConfig {
  double learning_rate = 1e-4;
  std::string lr_scheduler = "constant";  // constant | constant_with_warmup | linear | cosine
  int64_t lr_warmup_steps = 500;
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_weight_decay = 1e-4, adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;             // 0 = no clipping
  int64_t gradient_accumulation_steps = 1;
  bool block_major_accumulation = false;  // the micro-batches of an update block by block (train/block_major_step.h)
  int64_t max_train_steps = 0;            // 0: num_train_epochs * updates per epoch
  int64_t num_train_epochs = 1;
  std::string weighting_scheme = "none";  // none | logit_normal | mode | sigmoid
  double logit_mean = 0.0, logit_std = 1.0, mode_scale = 1.29, sigmoid_scale = 1.0;
  double timestep_shift = 1.0;            // 1 = no shift
  int64_t max_nonfinite_steps = 10;       // consecutive skipped updates before giving up
  uint64_t seed = 0;
  bool seed_given = false;                // false: a random seed was drawn (and is printed/stored)
  int64_t num_threads = 0;                // CPU intra-op threads; 0 = LibTorch's default
  // auto | on | off: micro-steps and the update replayed as CUDA graphs (train/step_graphs.h);
  // auto falls back to eager with the reason in the log, on refuses a run that cannot.
  std::string cuda_graph = "auto";
};

struct CheckpointConfig {
  std::string output_dir = "output";
  int64_t checkpointing_steps = 500;
  int64_t checkpoints_total_limit = 0;    // 0 = keep all
  std::string resume_from_checkpoint;     // "" | latest | PATH
  bool overwrite_output_dir = false;      // start anew in a folder holding another run's outputs
  // Metrics beside metrics.jsonl (flag names of EasyControl's / diffusers' train scripts).
  std::string report_to = "tensorboard";  // tensorboard | none
  std::string logging_dir = "logs";       // TensorBoard event files; relative to output_dir
};

struct ValidationConfig {
  int64_t validation_steps = 20;          // 0 = off; validation loss on fixed draws
  int64_t validation_samples = 4;
  int64_t test_h = 1024, test_w = 1024;   // validation image size
  // Validation images (src/train/validation.h), EasyControl's train.py flags: drawn every
  // validation_steps when a prompt is given, with fixed seeds so that steps compare.
  std::string validation_prompt;           // empty = no images
  int64_t num_validation_images = 4;
  std::vector<std::string> subject_test_images, spatial_test_images;  // "None" = none (as train.py)
  int64_t validation_inference_steps = 0;  // 0 = 28 for dev-style models, 4 for schnell
  double validation_guidance_scale = 3.5;
};


// Hidden options for tests (not in --help, not stored in config.json).
struct DebugConfig {
  int64_t fail_at_step = -1;              // throw on fail_rank when this many updates are done
  int64_t fail_rank = 0;
  bool float64 = false;                   // whole computation in float64 (exactness tests)
  bool save_masters = false;              // also write lora_masters.safetensors (master dtype)
  int64_t nan_at_step = -1;               // nan_rank's first update at this step is non-finite
  int64_t nan_rank = 0;
  bool tensorboard_image = false;         // a test-pattern image into TensorBoard at every update
};

void declare_options(OptionSet& s, TrainConfig& c);
void declare_options(OptionSet& s, CheckpointConfig& c);
void declare_options(OptionSet& s, ValidationConfig& c);
void declare_options(OptionSet& s, DebugConfig& c);

}  // namespace fluxtrain
