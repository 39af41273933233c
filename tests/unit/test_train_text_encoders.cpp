// The trainer in the three text-encoder modes on the tiny model with the tiny CLIP and T5
// (float64): the loss of a fixed batch falls; the right parameters move (transformer LoRA always,
// CLIP's LoRA in --train_text_encoder_one_only, CLIP's and T5's in --train_text_encoder) and the
// frozen encoder weights never change nor require grad. Multi-rank equality and resume are in
// tests/mpi/train_dist_test.py (text_encoders).
#include <gtest/gtest.h>

#include <iostream>
#include <sstream>

#include <ATen/ATen.h>

#include "core/fs.h"
#include "data/synth_data.h"
#include "encoders/text_encoders.h"
#include "encoders/tiny_text_encoders.h"
#include "model/flux_weights.h"
#include "support/test_util.h"
#include "train/run_config.h"
#include "train/trainer.h"

namespace fluxtrain {
namespace {

RunConfig make_config(const std::vector<std::string>& args) {
  std::vector<const char*> argv{"train"};
  for (const auto& a : args) argv.push_back(a.c_str());
  std::ostringstream help;
  return parse_train_args(static_cast<int>(argv.size()), argv.data(), help).config;
}

std::vector<at::Tensor> frozen(TextEncoders& e) {
  std::vector<at::Tensor> out;
  for (const EncoderLayerWeights* w : {&e.clip()->weights(), &e.t5()->weights()}) {
    for (const auto& kv : w->globals_) out.push_back(kv.second);
    for (const auto& layer : w->layers_)
      for (const auto& kv : layer) out.push_back(kv.second);
  }
  return out;
}

std::vector<at::Tensor> clones(const std::vector<at::Tensor>& v) {
  std::vector<at::Tensor> out;
  for (const auto& t : v) out.push_back(t.detach().clone());
  return out;
}

bool all_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!at::equal(a[i], b[i])) return false;
  return true;
}

// How many tensors moved (LoRA: B starts at zero; A moves once B is non-zero).
size_t moved(const std::vector<at::Tensor>& before, const std::vector<at::Tensor>& after) {
  size_t n = 0;
  for (size_t i = 0; i < before.size() && i < after.size(); ++i) n += at::equal(before[i], after[i]) ? 0 : 1;
  return n;
}

class TextEncoderModes : public ::testing::TestWithParam<std::string> {};

TEST_P(TextEncoderModes, LossFallsAndOnlyTheTrainedParametersMove) {
  const std::string mode = GetParam();
  TempDir tmp;
  const std::string model = tmp.path("model");
  make_directories(model);
  const FluxConfig cfg = FluxConfig::preset("tiny");
  save_bfl(path_join(model, "flux1-dev.safetensors"), cfg, init_random_weights(cfg, 0, at::kFloat));
  write_tiny_text_encoders(model, cfg.vec_in_dim, cfg.context_in_dim, 1, at::kFloat);
  SynthSpec spec;
  spec.num_samples = 4;
  spec.sizes = {8};
  spec.cond_latent_size = 8;
  spec.text_len = 4;
  write_synthetic_dataset(tmp.path("data.h5"), spec);
  std::vector<std::string> args = {"--pretrained_model_name_or_path", model, "--train_data", tmp.path("data.h5"),
                                   "--output_dir", tmp.path("out"), "--mixed_precision", "no", "--device", "cpu",
                                   "--ranks", "8", "--network_alphas", "8", "--cond_size", "64", "--noise_size", "64",
                                   "--seed", "3", "--validation_steps", "0", "--learning_rate", "1e-2",
                                   "--max_grad_norm", "1", "--max_sequence_length", "8", "--text_encoder_lr", "1e-2",
                                   "--text_encoder_rank", "4", "--text_encoder_alpha", "4"};
  if (mode != "none") args.push_back("--" + mode);
  TrainerOptions o;
  o.compute_dtype = at::kDouble;
  o.tty = 0;
  Trainer t(make_config(args), o);

  TextEncoders* te = t.text_encoders();
  ASSERT_EQ(te != nullptr, mode != "none");  // neither mode, cached embeddings: no encoder loaded
  std::vector<at::Tensor> frozen_before, clip_before, t5_before;
  if (te) {
    for (const auto& w : frozen(*te)) EXPECT_FALSE(w.requires_grad());
    frozen_before = clones(frozen(*te));
    clip_before = clones(te->clip_lora_parameters());
    t5_before = clones(te->t5_lora_parameters());
    EXPECT_FALSE(clip_before.empty());
    EXPECT_EQ(t5_before.empty(), mode != "train_text_encoder");
  }
  const std::vector<at::Tensor> lora_before = clones(t.lora().parameters());

  Batch b;
  for (int64_t i = 0; i < 4; ++i) b.samples.push_back(t.dataset().read(i));
  double first = 0, last = 0;
  for (int i = 0; i < 25; ++i) {
    const StepResult r = t.train_step_on({b});
    ASSERT_FALSE(r.skipped);
    if (i == 0) first = r.loss;
    last = r.loss;
  }
  std::cout << mode << ": fixed-batch loss " << first << " -> " << last << "\n";
  EXPECT_LT(last, 0.8 * first);
  // The transformer's LoRA: most adapters (a few get no gradient: e.g. the condition rows' q in
  // the last block feed nothing downstream).
  EXPECT_GT(moved(lora_before, clones(t.lora().parameters())), lora_before.size() / 2);
  if (te) {
    EXPECT_TRUE(all_equal(frozen_before, frozen(*te))) << "a frozen encoder weight changed";
    // Every text-encoder LoRA tensor of the trained encoders (all reach the conditioning).
    EXPECT_EQ(moved(clip_before, clones(te->clip_lora_parameters())), clip_before.size());
    if (mode == "train_text_encoder") EXPECT_EQ(moved(t5_before, clones(te->t5_lora_parameters())), t5_before.size());
    else EXPECT_TRUE(te->t5_lora_parameters().empty());
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, TextEncoderModes,
                         ::testing::Values("none", "train_text_encoder_one_only", "train_text_encoder"));

}  // namespace
}  // namespace fluxtrain
