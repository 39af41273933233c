// Configuration of `fluxtrain train`: one struct per area, filled from the command line and an
// optional INI file (--config FILE; the command line wins), validated in one place (validate()),
// and printable as resolved JSON (stored in every checkpoint).
//
// Option names and defaults follow EasyControl's train.py where it has the option. Options that
// take effect in a later issue (text encoder training, validation image size) are parsed and
// validated now so that presets and scripts written today keep working.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "model/lora.h"

namespace fluxtrain {

struct ModelConfig {
  std::string pretrained_model_name_or_path;  // FLUX snapshot dir, diffusers folder or BFL file
  std::string model_layout = "auto";          // auto | bfl | diffusers
  std::string mixed_precision = "bf16";       // no (float32) | bf16; frozen weights + activations
  std::string device = "auto";                // auto | cpu | cuda
  bool gradient_checkpointing = false;
  double guidance_scale = 1.0;                // training guidance (guidance-embed models)
};

struct DataConfig {
  std::string train_data;          // HDF5 dataset (docs/dataset.md)
  int64_t train_batch_size = 1;    // per rank, per micro-batch
  int64_t cond_size = 512;         // pixels; condition latents may not be larger
  int64_t noise_size = 1024;       // pixels; target latents may not be larger
  int64_t prefetch_batches = 2;    // micro-batches the background reader keeps ready
};

struct TrainConfig {
  double learning_rate = 1e-4;
  std::string lr_scheduler = "constant";  // constant | constant_with_warmup | linear | cosine
  int64_t lr_warmup_steps = 500;
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_weight_decay = 1e-4, adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;             // 0 = no clipping
  int64_t gradient_accumulation_steps = 1;
  int64_t max_train_steps = 0;            // 0: num_train_epochs * updates per epoch
  int64_t num_train_epochs = 1;
  std::string weighting_scheme = "none";  // none | logit_normal | mode | sigmoid
  double logit_mean = 0.0, logit_std = 1.0, mode_scale = 1.29, sigmoid_scale = 1.0;
  double timestep_shift = 1.0;            // 1 = no shift
  int64_t max_nonfinite_steps = 10;       // consecutive skipped updates before giving up
  uint64_t seed = 0;
  bool seed_given = false;                // false: a random seed was drawn (and is printed/stored)
  int64_t num_threads = 0;                // CPU intra-op threads; 0 = LibTorch's default
};

struct CheckpointConfig {
  std::string output_dir = "output";
  int64_t checkpointing_steps = 500;
  int64_t checkpoints_total_limit = 0;    // 0 = keep all
  std::string resume_from_checkpoint;     // "" | latest | PATH
  bool overwrite_output_dir = false;      // start anew in a folder holding another run's outputs
};

struct ValidationConfig {
  int64_t validation_steps = 20;          // 0 = off; validation loss on fixed draws
  int64_t validation_samples = 4;
  int64_t test_h = 1024, test_w = 1024;   // validation image size (encoders issue)
};

struct TextEncoderConfig {                // parsed now; trained in the encoders issue
  bool train_text_encoder = false;
  bool train_text_encoder_one_only = false;
  int64_t text_encoder_rank = 64;
  double text_encoder_alpha = 64;
  double text_encoder_lr = 5e-6;
};

struct DistConfig {                       // docs/distributed.md
  bool shard_weights = false;             // FSDP-style frozen blocks (always on with > 1 rank)
  bool shard_optimizer = false;           // reduce-scattered gradients, AdamW state split over ranks
  int64_t encoder_rank = 0;               // rank that encodes conditioning (encoders issue)
  double nccl_timeout = 600;              // seconds before a stuck NCCL collective aborts the job
  double mpi_timeout = 600;               // the same for MPI (CPU) collectives
};

// Hidden options for tests (not in --help, not stored in config.json).
struct DebugConfig {
  int64_t fail_at_step = -1;              // throw on fail_rank when this many updates are done
  int64_t fail_rank = 0;
  bool float64 = false;                   // whole computation in float64 (exactness tests)
  bool save_masters = false;              // also write lora_masters.safetensors (master dtype)
  int64_t nan_at_step = -1;               // nan_rank's first update at this step is non-finite
  int64_t nan_rank = 0;
};

struct RunConfig {
  std::string config_file;  // the INI it came from, if any
  ModelConfig model;
  LoraConfig lora;          // defined in model/lora.h
  DataConfig data;
  TrainConfig train;
  CheckpointConfig checkpoint;
  ValidationConfig validation;
  TextEncoderConfig text_encoder;
  DistConfig dist;
  DebugConfig debug;

  // Every cross-field and range check; throws Error naming the flag and what was expected.
  void validate() const;
  nlohmann::json to_json() const;
};

struct ParsedArgs {
  bool help = false;      // --help was printed; nothing else to do
  RunConfig config;
};

// Parses `fluxtrain train` arguments; argv[0] is the program/subcommand name. Prints --help to
// `out`. Throws Error (one line, naming the flag or the INI file) on anything unknown or invalid.
ParsedArgs parse_train_args(int argc, const char* const* argv, std::ostream& out);

// Helpers shared with other subcommands.
std::string lora_mode_name(LoraMode m);

}  // namespace fluxtrain
