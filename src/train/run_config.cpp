#include "train/run_config.h"

#include <algorithm>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/limits.h"
#include "core/options.h"

namespace fluxtrain {
namespace {

// The option table of `train`, bound to c. Groups are created in --help order.
void declare_all(OptionSet& s, RunConfig& c) {
  for (const char* g : {"General", "Model", "LoRA", "Data", "Optimisation", "Learning-rate schedule", "Timesteps",
                        "Checkpoints", "Validation"})
    s.group(g);
  declare_options(s, c.checkpoint);
  declare_options(s, c.train);
  declare_options(s, c.model);
  declare_options(s, c.lora);
  declare_options(s, c.data);
  declare_options(s, c.validation);
  declare_options(s, c.text_encoder);
  declare_options(s, c.dist);
  declare_options(s, c.low_memory);
  declare_options(s, c.debug);
}

// Upper bounds of the sizes in a run (core/limits.h), on top of each option's own rule.
void check_run_limits(const RunConfig& c) {
  using namespace limits;
  auto flag = [](const char* name) { return std::string("--") + name; };
  const int64_t hw = std::max<unsigned>(1, std::thread::hardware_concurrency());
  check_range(flag("num_threads"), c.train.num_threads, 0, max_threads(),
              " (this machine has " + std::to_string(hw) + " hardware threads; 0 = LibTorch's default)");
  check_range(flag("train_batch_size"), c.data.train_batch_size, 1, kMaxBatch);
  check_range(flag("prefetch_batches"), c.data.prefetch_batches, 1, kMaxPrefetch);
  check_range(flag("cond_size"), c.data.cond_size, 16, kMaxImageSize);
  check_range(flag("noise_size"), c.data.noise_size, 16, kMaxImageSize);
  check_range(flag("gradient_accumulation_steps"), c.train.gradient_accumulation_steps, 1, kMaxAccumulation);
  check_range(flag("max_train_steps"), c.train.max_train_steps, 0, kMaxSteps);
  if (c.train.max_train_steps == 0) check_range(flag("num_train_epochs"), c.train.num_train_epochs, 1, kMaxEpochs);
  check_range(flag("lr_warmup_steps"), c.train.lr_warmup_steps, 0, kMaxSteps);
  check_range(flag("max_nonfinite_steps"), c.train.max_nonfinite_steps, 1, kMaxSteps);
  check_range(flag("checkpointing_steps"), c.checkpoint.checkpointing_steps, 1, kMaxSteps);
  check_range(flag("checkpoints_total_limit"), c.checkpoint.checkpoints_total_limit, 0, kMaxCheckpointsKept);
  check_range(flag("validation_steps"), c.validation.validation_steps, 0, kMaxSteps);
  check_range(flag("validation_samples"), c.validation.validation_samples, 1, kMaxValidationSamples);
  check_range(flag("test_h"), c.validation.test_h, 16, kMaxImageSize);
  check_range(flag("test_w"), c.validation.test_w, 16, kMaxImageSize);
  check_range(flag("num_validation_images"), c.validation.num_validation_images, 1, kMaxValidationImages);
  check_range(flag("validation_inference_steps"), c.validation.validation_inference_steps, 0, kMaxInferenceSteps);
  for (int64_t r : c.lora.ranks)
    check_range(flag("ranks") + " values", r, 1, kMaxLoraRank, " (a LoRA rank above the layer width saves nothing)");
  check_range(flag("lora_num"), static_cast<int64_t>(c.lora.lora_num), 1, kMaxLoraNum);
  for (int b : c.lora.blocks) check_range(flag("lora_blocks") + " values", static_cast<int64_t>(b), 0, kMaxBlockIndex);
  check_range(flag("text_encoder_rank"), c.text_encoder.text_encoder_rank, 1, kMaxLoraRank);
  check_range(flag("encoder_process"), c.dist.encoder_rank, 0, kMaxRanks - 1);
  check_range(flag("nccl_timeout"), c.dist.nccl_timeout, 1e-3, kMaxTimeoutSeconds, " seconds");
  check_range(flag("mpi_timeout"), c.dist.mpi_timeout, 1e-3, kMaxTimeoutSeconds, " seconds");
  check_range(flag("debug_fail_rank"), c.debug.fail_rank, 0, kMaxRanks - 1);
  check_range(flag("debug_nan_rank"), c.debug.nan_rank, 0, kMaxRanks - 1);
  if (c.checkpoint.overwrite_output_dir && c.checkpoint.resume_from_checkpoint == "latest")
    throw Error("--overwrite_output_dir and --resume_from_checkpoint latest contradict each other: continue the run in "
                "--output_dir (drop --overwrite_output_dir) or start a new one there (drop --resume_from_checkpoint)");
}

// Checks that involve more than one option (each option's own range is its rule).
void check_across(const RunConfig& c) {
  auto need = [](bool ok, const std::string& msg) {
    if (!ok) throw Error(msg);
  };
  need(!c.model.pretrained_model_name_or_path.empty(), "--pretrained_model_name_or_path is required");
  c.lora.validate();
  c.low_memory.validate();
  c.text_encoder.validate();
  check_run_limits(c);
  need(!c.data.train_data.empty(), "--train_data is required (an HDF5 dataset, see docs/dataset.md)");
  if (c.train.max_train_steps == 0)
    need(c.train.num_train_epochs > 0,
         "--num_train_epochs must be positive, got " + std::to_string(c.train.num_train_epochs));
  if (c.train.max_train_steps > 0 && (c.train.lr_scheduler == "linear" || c.train.lr_scheduler == "cosine"))
    need(c.train.lr_warmup_steps < c.train.max_train_steps,
         "--lr_warmup_steps " + std::to_string(c.train.lr_warmup_steps) + " must be below --max_train_steps " +
             std::to_string(c.train.max_train_steps) + " for --lr_scheduler " + c.train.lr_scheduler);
  need(!(c.text_encoder.train_text_encoder && c.text_encoder.train_text_encoder_one_only),
       "--train_text_encoder and --train_text_encoder_one_only contradict each other: choose one "
       "(both encoders, or text encoder one only)");
}

}  // namespace

ParsedArgs parse_train_args(int argc, const char* const* argv, std::ostream& out) {
  ParsedArgs result;
  RunConfig& c = result.config;
  OptionSet s("train", "fluxtrain train: LoRA training of FLUX.1 (EasyControl condition LoRA or plain LoRA)");
  s.allow_config_file(&c.config_file);
  declare_all(s, c);
  if (!s.parse(argc, argv, out)) {
    result.help = true;
    return result;
  }
  if (!c.train.seed_given) {
    // Unseeded runs are still reproducible: the drawn seed is printed and stored in checkpoints.
    std::random_device rd;
    c.train.seed = ((static_cast<uint64_t>(rd()) << 32) | rd()) & 0x7fffffffffffffffull;
  }
  check_across(c);
  return result;
}

void RunConfig::validate() const {
  RunConfig copy = *this;  // the table binds to fields; validate a copy
  OptionSet s("train");
  declare_all(s, copy);
  s.validate();
  check_across(copy);
}

nlohmann::json RunConfig::to_json() const {
  RunConfig copy = *this;
  OptionSet s("train");
  declare_all(s, copy);
  nlohmann::json j = s.json();
  j["config_file"] = config_file;
  j["train"]["seed_given"] = train.seed_given;
  return j;
}

}  // namespace fluxtrain
