#include "train/train_options.h"

#include <algorithm>
#include <cmath>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/options.h"

namespace fluxtrain {

void declare_options(OptionSet& s, TrainConfig& c) {
  s.group("General").section("train")
      .add_custom("seed", "seed of every random draw (default: drawn at random, printed and stored)", "",
                  [&c](const std::string& f, const std::string& v) {
                    size_t pos = 0;
                    long long x = -1;
                    try {
                      x = std::stoll(v, &pos);
                    } catch (...) {
                      pos = 0;
                    }
                    if (pos == 0 || pos != v.size() || x < 0)
                      throw Error(f + " must be a non-negative integer, got " + v);
                    c.seed = static_cast<uint64_t>(x);
                    c.seed_given = true;
                  },
                  [&c] { return nlohmann::json(c.seed); })
      .add("num_threads", &c.num_threads, "CPU threads for LibTorch (0 = its default; at most 4 per hardware thread)",
           rules::non_negative())
      .add("cuda_graph", &c.cuda_graph,
           "auto | on | off: replay each micro-step and the update as CUDA graphs (auto: where the run allows it, "
           "else eager with the reason in the log; on: refuse a run that cannot)",
           rules::one_of({"auto", "on", "off"}));
  s.group("Optimisation", "train")
      .add("learning_rate", &c.learning_rate, "AdamW learning rate", rules::positive_number(), "1e-4")
      .add("adam_beta1", &c.adam_beta1, "", rules::in_range(0, 1, true, "[0, 1)"))
      .add("adam_beta2", &c.adam_beta2, "", rules::in_range(0, 1, true, "[0, 1)"))
      .add("adam_weight_decay", &c.adam_weight_decay, "decoupled weight decay",
           [](const std::string& f, const double& v) {
             if (!std::isfinite(v) || v < 0) throw Error(f + " must be >= 0");
           },
           "1e-4")
      .add("adam_epsilon", &c.adam_epsilon, "", rules::positive_number(), "1e-8")
      .add("max_grad_norm", &c.max_grad_norm, "clip the global gradient norm (0 = off)",
           [](const std::string& f, const double& v) {
             if (!std::isfinite(v) || v < 0) throw Error(f + " must be >= 0 (0 = off)");
           })
      .add("gradient_accumulation_steps", &c.gradient_accumulation_steps, "micro-batches per update",
           rules::positive())
      .add("block_major_accumulation", &c.block_major_accumulation,
           "run an update's micro-batches through the transformer together, block by block, with one backward: "
           "streamed/sharded/fp8 blocks are fetched once per update instead of once per micro-batch; costs the "
           "activations of all micro-batches at once (docs/memory.md)")
      .add("max_train_steps", &c.max_train_steps, "updates to run (0 = num_train_epochs worth)", rules::non_negative())
      .add("num_train_epochs", &c.num_train_epochs, "used when max_train_steps is 0")
      .add("max_nonfinite_steps", &c.max_nonfinite_steps,
           "stop after this many updates in a row skipped for a non-finite loss or gradient", rules::positive());
  s.group("Learning-rate schedule", "train")
      .add("lr_scheduler", &c.lr_scheduler, "constant | constant_with_warmup | linear | cosine",
           rules::one_of({"constant", "constant_with_warmup", "linear", "cosine"}))
      .add("lr_warmup_steps", &c.lr_warmup_steps, "linear warm-up (not used by constant)", rules::non_negative());
  s.group("Timesteps", "train")
      .add("weighting_scheme", &c.weighting_scheme, "timestep density: none (uniform) | logit_normal | mode | sigmoid",
           rules::one_of({"none", "logit_normal", "mode", "sigmoid"}))
      .add("logit_mean", &c.logit_mean, "logit_normal mean", rules::finite())
      .add("logit_std", &c.logit_std, "logit_normal standard deviation", rules::positive_number())
      // Beyond 1/(pi/2 - 1) the mode map stops being monotone and leaves [0, 1].
      .add("mode_scale", &c.mode_scale, "mode scheme scale, in [0, 1.75)", rules::in_range(0, 1.75, true, "[0, 1.75)"))
      .add("sigmoid_scale", &c.sigmoid_scale, "sigmoid scheme: sigmoid(scale * N(0,1))", rules::positive_number())
      .add("timestep_shift", &c.timestep_shift, "sigma' = shift*sigma / (1 + (shift-1)*sigma); 1 = none",
           rules::positive_number());
}

void declare_options(OptionSet& s, CheckpointConfig& c) {
  s.group("General").section("checkpoint")
      .add("output_dir", &c.output_dir, "checkpoints, metrics.jsonl, lora.safetensors",
           [](const std::string& f, const std::string& v) {
             if (v.empty()) throw Error(f + " must not be empty");
           });
  s.group("Checkpoints", "checkpoint")
      .add("checkpointing_steps", &c.checkpointing_steps, "write a checkpoint every N updates (and at the end)",
           rules::positive())
      .add("checkpoints_total_limit", &c.checkpoints_total_limit, "keep at most N checkpoints (0 = all)",
           rules::non_negative())
      .add("resume_from_checkpoint", &c.resume_from_checkpoint,
           "latest (newest complete checkpoint in output_dir, if any) or a checkpoint file")
      .add("overwrite_output_dir", &c.overwrite_output_dir,
           "start a new run in an output_dir that holds another run's outputs (they are moved to previous-run-N/)");
  s.group("Logging", "checkpoint")
      .add("report_to", &c.report_to, "tensorboard (event files in --logging_dir, beside metrics.jsonl) or none",
           rules::one_of({"tensorboard", "none"}))
      .add("logging_dir", &c.logging_dir, "TensorBoard log folder, relative to output_dir unless absolute",
           [](const std::string& f, const std::string& v) {
             if (v.empty()) throw Error(f + " must not be empty");
           });
}

void declare_options(OptionSet& s, ValidationConfig& c) {
  s.group("Validation", "validation")
      .add("validation_steps", &c.validation_steps, "validation loss every N updates (0 = off)", rules::non_negative())
      .add("validation_samples", &c.validation_samples, "samples in the validation loss (fixed noise and timesteps)",
           rules::positive())
      .add("test_h", &c.test_h, "validation image height (multiple of 16)", rules::multiple_of_16())
      .add("test_w", &c.test_w, "validation image width (multiple of 16)", rules::multiple_of_16())
      .add("validation_prompt", &c.validation_prompt, "prompt of the validation images (empty = no images)")
      .add("num_validation_images", &c.num_validation_images, "validation images per validation (fixed seeds)",
           rules::positive())
      .add("subject_test_images", &c.subject_test_images, "subject condition images of the validation images, one "
           "per subject condition (None = none)")
      .add("spatial_test_images", &c.spatial_test_images, "spatial condition images of the validation images, one "
           "per spatial condition (None = none)")
      .add("validation_inference_steps", &c.validation_inference_steps,
           "sampling steps of the validation images (0 = 28, schnell 4)", rules::non_negative())
      .add("validation_guidance_scale", &c.validation_guidance_scale, "guidance of the validation images (dev models)",
           rules::non_negative());
}

void declare_options(OptionSet& s, DebugConfig& c) {
  auto non_negative_rank = [](const std::string& f, const int64_t& v) {
    if (v < 0) throw Error(f + " must be >= 0");
  };
  s.group("Debug (hidden)").hidden()
      .add("debug_fail_at_step", &c.fail_at_step, "throw on --debug_fail_rank once this many updates are done")
      .add("debug_fail_rank", &c.fail_rank, "", non_negative_rank)
      .add("debug_float64", &c.float64, "")
      .add("debug_save_masters", &c.save_masters, "")
      .add("debug_nan_at_step", &c.nan_at_step, "--debug_nan_rank's first update at this step counts as non-finite")
      .add("debug_nan_rank", &c.nan_rank, "", non_negative_rank)
      .add("debug_tensorboard_image", &c.tensorboard_image, "a test-pattern image into TensorBoard at every update");
}

}  // namespace fluxtrain
