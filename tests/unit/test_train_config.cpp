// `fluxtrain train` configuration: EasyControl's defaults, INI + command line precedence, the
// presets of configs/, and one clear line for every bad or contradictory flag, both in-process and
// through the built binary (non-zero exit, nothing written).
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "train/run_config.h"
#include "core/error.h"
#include "core/fs.h"
#include "support/test_util.h"

namespace fluxtrain {
namespace {

std::vector<std::string> required() {
  return {"--pretrained_model_name_or_path", "model", "--train_data", "data.h5"};
}

RunConfig parse(std::vector<std::string> args, bool with_required = true) {
  std::vector<std::string> all{"train"};
  if (with_required)
    for (const auto& a : required()) all.push_back(a);
  all.insert(all.end(), args.begin(), args.end());
  std::vector<const char*> argv;
  for (const auto& a : all) argv.push_back(a.c_str());
  std::ostringstream help;
  return parse_train_args(static_cast<int>(argv.size()), argv.data(), help).config;
}

void expect_bad(const std::vector<std::string>& args, const std::string& needle, bool with_required = true) {
  try {
    parse(args, with_required);
    ADD_FAILURE() << "accepted; expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(needle), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << "not one line: " << m;
    EXPECT_EQ(e.exit_code(), 2);
  }
}

std::string write_file(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
  return path;
}

TEST(TrainConfig, DefaultsFollowEasyControl) {
  const RunConfig c = parse({"--seed", "3"});
  EXPECT_EQ(c.lora.ranks, std::vector<int64_t>{128});
  EXPECT_EQ(c.lora.alphas, std::vector<double>{128});
  EXPECT_EQ(c.lora.lora_num, 1);
  EXPECT_EQ(c.lora.mode, LoraMode::EasyControl);
  EXPECT_EQ(c.data.cond_size, 512);
  EXPECT_EQ(c.data.noise_size, 1024);
  EXPECT_EQ(c.data.train_batch_size, 1);
  EXPECT_EQ(c.validation.test_h, 1024);
  EXPECT_EQ(c.validation.test_w, 1024);
  EXPECT_EQ(c.train.learning_rate, 1e-4);
  EXPECT_EQ(c.train.lr_scheduler, "constant");
  EXPECT_EQ(c.train.lr_warmup_steps, 500);
  EXPECT_EQ(c.train.adam_beta1, 0.9);
  EXPECT_EQ(c.train.adam_beta2, 0.999);
  EXPECT_EQ(c.train.adam_weight_decay, 1e-4);
  EXPECT_EQ(c.train.adam_epsilon, 1e-8);
  EXPECT_EQ(c.train.max_grad_norm, 1.0);
  EXPECT_EQ(c.train.gradient_accumulation_steps, 1);
  EXPECT_FALSE(c.model.gradient_checkpointing);
  EXPECT_EQ(c.model.checkpoint_attention, "auto");
  EXPECT_EQ(c.model.mixed_precision, "bf16");
  EXPECT_EQ(c.model.guidance_scale, 1.0);
  EXPECT_EQ(c.train.weighting_scheme, "none");
  EXPECT_EQ(c.train.logit_mean, 0.0);
  EXPECT_EQ(c.train.logit_std, 1.0);
  EXPECT_EQ(c.train.mode_scale, 1.29);
  EXPECT_EQ(c.train.timestep_shift, 1.0);
  EXPECT_EQ(c.train.seed, 3u);
  EXPECT_TRUE(c.train.seed_given);
  EXPECT_FALSE(c.text_encoder.train_text_encoder);
  EXPECT_FALSE(c.text_encoder.train_text_encoder_one_only);
  // Without --seed a seed is drawn, recorded and marked as such.
  EXPECT_FALSE(parse({}).train.seed_given);
}

TEST(TrainConfig, IniFileWithSectionsAndCommandLineWins) {
  TempDir tmp;
  const std::string ini = write_file(tmp.path("x.ini"),
                                     "# comment\n"
                                     "learning_rate = 3e-4\n"
                                     "[lora]\n"
                                     "lora_num = 2\n"
                                     "ranks = 32 16\n"
                                     "network_alphas = 32,8\n"
                                     "[model]\n"
                                     "gradient_checkpointing = true\n"
                                     "cond_size = 256\n");
  RunConfig c = parse({"--config", ini, "--cond_size", "512"});
  EXPECT_EQ(c.train.learning_rate, 3e-4);
  EXPECT_EQ(c.lora.lora_num, 2);
  EXPECT_EQ(c.lora.ranks, (std::vector<int64_t>{32, 16}));
  EXPECT_EQ(c.lora.alphas, (std::vector<double>{32, 8}));
  EXPECT_TRUE(c.model.gradient_checkpointing);
  EXPECT_EQ(c.data.cond_size, 512);  // the command line wins
  c = parse({"--config", ini, "--gradient_checkpointing=false", "--ranks", "8", "8", "--logit_mean", "-0.5"});
  EXPECT_FALSE(c.model.gradient_checkpointing);
  EXPECT_EQ(c.lora.ranks, (std::vector<int64_t>{8, 8}));
  EXPECT_EQ(c.train.logit_mean, -0.5);  // negative numbers are values, not options
  EXPECT_TRUE(parse({"--gradient_checkpointing"}).model.gradient_checkpointing);
  EXPECT_TRUE(parse({"--gradient_checkpointing", "--seed", "1"}).model.gradient_checkpointing);
  EXPECT_FALSE(parse({"--config", ini, "--gradient_checkpointing", "false"}).model.gradient_checkpointing);
}

TEST(TrainConfig, ResolvedJsonHasEveryArea) {
  const nlohmann::json j = parse({"--seed", "9", "--ranks", "4", "--network_alphas", "2"}).to_json();
  for (const char* k : {"model", "lora", "data", "train", "checkpoint", "validation", "text_encoder"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["train"]["seed"], 9);
  EXPECT_EQ(j["lora"]["ranks"], nlohmann::json::array({4}));
  EXPECT_EQ(j["lora"]["lora_mode"], "easycontrol");
}

TEST(TrainConfig, HelpIsGroupedWithDefaults) {
  std::ostringstream out;
  const char* argv[] = {"train", "--help"};
  EXPECT_TRUE(parse_train_args(2, argv, out).help);
  const std::string h = out.str();
  for (const char* s : {"General", "Model", "LoRA", "Data", "Optimisation", "Learning-rate schedule", "Timesteps",
                        "Checkpoints", "Validation", "Text encoders", "--learning_rate", "(=1e-4)", "--ranks",
                        "(=128)", "--cond_size", "(=512)", "--weighting_scheme", "(=none)"})
    EXPECT_NE(h.find(s), std::string::npos) << s;
}

TEST(TrainConfig, BadAndContradictoryFlagsGiveOneClearLine) {
  expect_bad({"--train_text_encoder", "--train_text_encoder_one_only"},
             "--train_text_encoder and --train_text_encoder_one_only contradict each other");
  expect_bad({"--cond_size", "500"}, "--cond_size 500 is not a positive multiple of 16");
  expect_bad({"--noise_size", "1000"}, "--noise_size 1000 is not a positive multiple of 16");
  expect_bad({"--test_h", "0"}, "--test_h 0 is not a positive multiple of 16");
  expect_bad({"--ranks", "64", "64", "--network_alphas", "64", "64"}, "--ranks has 2 values, expected one per condition (--lora_num 1)");
  expect_bad({"--lora_num", "2"}, "--ranks has 1 values, expected one per condition (--lora_num 2)");
  expect_bad({"--ranks", "64", "32", "--lora_num", "2"}, "--ranks has 2 values but --network_alphas has 1");
  expect_bad({"--ranks", "0"}, "--ranks values must be positive");
  expect_bad({"--ranks", "abc"}, "--ranks: 'abc' is not an integer");
  expect_bad({"--bogus_flag", "1"}, "unknown option --bogus_flag");
  expect_bad({"--rank", "4"}, "unknown option --rank");  // no prefix guessing
  expect_bad({"stray"}, "unexpected argument 'stray'");
  expect_bad({"--gradient_checkpointing", "maybe"}, "gradient_checkpointing");
  expect_bad({"--checkpoint_attention", "yes"}, "--checkpoint_attention must be one of auto | off | on, got 'yes'");
  expect_bad({"--mixed_precision", "fp16"}, "--mixed_precision fp16 is not supported");
  expect_bad({"--mixed_precision", "fp8"}, "--mixed_precision must be one of bf16 | no, got 'fp8'");
  expect_bad({"--lr_scheduler", "polynomial"}, "--lr_scheduler must be one of");
  expect_bad({"--weighting_scheme", "cosmap"}, "--weighting_scheme must be one of");
  expect_bad({"--lora_mode", "dora"}, "--lora_mode must be easycontrol or standard");
  expect_bad({"--lora_targets", "to_q"}, "--lora_targets only applies to --lora_mode standard");
  expect_bad({"--lora_mode", "standard", "--lora_targets", "to_x"}, "--lora_targets: unknown target 'to_x'");
  expect_bad({"--train_batch_size", "0"}, "--train_batch_size must be positive, got 0");
  expect_bad({"--train_batch_size", "two"}, "train_batch_size");
  expect_bad({"--gradient_accumulation_steps", "-1"}, "--gradient_accumulation_steps must be positive");
  expect_bad({"--learning_rate", "-1e-4"}, "--learning_rate must be positive");
  expect_bad({"--adam_beta2", "1"}, "--adam_beta2 must be in [0, 1)");
  expect_bad({"--logit_std", "0"}, "--logit_std must be positive");
  expect_bad({"--mode_scale", "2"}, "--mode_scale must be in [0, 1.75)");
  expect_bad({"--timestep_shift", "0"}, "--timestep_shift must be positive");
  expect_bad({"--seed", "-4"}, "--seed must be a non-negative integer");
  expect_bad({"--max_nonfinite_steps", "0"}, "--max_nonfinite_steps must be positive");
  expect_bad({"--checkpointing_steps", "0"}, "--checkpointing_steps must be positive");
  expect_bad({"--lr_scheduler", "cosine", "--max_train_steps", "100", "--lr_warmup_steps", "100"},
             "--lr_warmup_steps 100 must be below --max_train_steps 100");
  expect_bad({"--text_encoder_rank", "0"}, "--text_encoder_rank must be positive");
  expect_bad({"--device", "tpu"}, "--device must be one of");
  expect_bad({"--learning_rate"}, "learning_rate");
  expect_bad({"--cond_size", "256", "--cond_size", "512"}, "cond_size");
  expect_bad({}, "--pretrained_model_name_or_path is required", false);
  expect_bad({"--pretrained_model_name_or_path", "m"}, "--train_data is required", false);
}

TEST(TrainConfig, DistributedOptionsAndHiddenDebugOptions) {
  RunConfig c = parse({});
  EXPECT_FALSE(c.dist.shard_weights);
  EXPECT_FALSE(c.dist.shard_optimizer);
  EXPECT_EQ(c.dist.encoder_rank, 0);
  EXPECT_EQ(c.dist.nccl_timeout, 600);
  c = parse({"--shard_weights", "--shard_optimizer", "--encoder_rank", "3", "--nccl_timeout", "90.5"});
  EXPECT_TRUE(c.dist.shard_weights && c.dist.shard_optimizer);
  EXPECT_EQ(c.dist.encoder_rank, 3);
  EXPECT_EQ(c.dist.nccl_timeout, 90.5);
  const nlohmann::json j = c.to_json();
  EXPECT_EQ(j["distributed"]["shard_optimizer"], true);
  EXPECT_EQ(j["distributed"]["nccl_timeout"], 90.5);
  EXPECT_FALSE(j.contains("debug"));  // test hooks are not part of a run's configuration

  c = parse({"--debug_fail_at_step", "3", "--debug_fail_rank", "1", "--debug_float64", "--debug_nan_at_step", "2"});
  EXPECT_EQ(c.debug.fail_at_step, 3);
  EXPECT_EQ(c.debug.fail_rank, 1);
  EXPECT_TRUE(c.debug.float64);
  EXPECT_EQ(c.debug.nan_at_step, 2);
  EXPECT_EQ(parse({}).debug.fail_at_step, -1);

  std::ostringstream out;
  const char* argv[] = {"train", "--help"};
  parse_train_args(2, argv, out);
  const std::string h = out.str();
  for (const char* s : {"Distributed", "--shard_weights", "--shard_optimizer", "--encoder_rank", "--nccl_timeout", "(=600)"})
    EXPECT_NE(h.find(s), std::string::npos) << s;
  EXPECT_EQ(h.find("debug"), std::string::npos) << "hidden options shown by --help";

  expect_bad({"--nccl_timeout", "0"}, "--nccl_timeout must be a positive number of seconds");
  expect_bad({"--nccl_timeout", "nan"}, "--nccl_timeout must be a positive number of seconds");
  expect_bad({"--encoder_rank", "-1"}, "--encoder_rank must be >= 0");
  expect_bad({"--debug_fail_rank", "-1"}, "--debug_fail_rank must be >= 0");
}

TEST(TrainConfig, BadIniFilesNameTheFile) {
  TempDir tmp;
  expect_bad({"--config", tmp.path("missing.ini")}, "--config " + tmp.path("missing.ini") + ": cannot open file");
  const std::string unknown = write_file(tmp.path("u.ini"), "[lora]\nrankz = 4\n");
  expect_bad({"--config", unknown}, unknown + ": unknown option 'lora.rankz'");
  const std::string bad_value = write_file(tmp.path("v.ini"), "cond_size = big\n");
  expect_bad({"--config", bad_value}, bad_value + ":");
  const std::string nested = write_file(tmp.path("n.ini"), "config = other.ini\n");
  expect_bad({"--config", nested}, "unknown option 'config'");
  const std::string contradict = write_file(tmp.path("c.ini"), "train_text_encoder = true\n");
  expect_bad({"--config", contradict, "--train_text_encoder_one_only"}, "contradict each other");
}

struct Preset {
  const char* file;
  int64_t rank, te_rank, cond, noise, test, accum, validation;
  bool te_both, te_one;
};

TEST(TrainConfig, PresetsMatchTheSeedGuide) {
  const Preset presets[] = {
      {"standard.ini", 64, 32, 384, 768, 768, 1, 50, true, false},
      {"text-encoder-one-only.ini", 64, 32, 384, 768, 768, 1, 50, false, true},
      {"text-encoder-one-low-memory.ini", 32, 16, 256, 512, 512, 2, 100, false, true},
      {"ultra-low.ini", 16, 8, 192, 384, 384, 4, 200, false, true},
      {"no-text-encoder.ini", 32, 64, 256, 512, 512, 2, 100, false, false},
  };
  for (const auto& p : presets) {
    SCOPED_TRACE(p.file);
    const RunConfig c = parse({"--config", std::string(FLUXTRAIN_SOURCE_DIR) + "/configs/" + p.file});
    EXPECT_EQ(c.lora.ranks, std::vector<int64_t>{p.rank});
    EXPECT_EQ(c.lora.alphas, std::vector<double>{static_cast<double>(p.rank)});
    EXPECT_EQ(c.text_encoder.text_encoder_rank, p.te_rank);
    EXPECT_EQ(c.data.cond_size, p.cond);
    EXPECT_EQ(c.data.noise_size, p.noise);
    EXPECT_EQ(c.validation.test_h, p.test);
    EXPECT_EQ(c.validation.test_w, p.test);
    EXPECT_EQ(c.train.gradient_accumulation_steps, p.accum);
    EXPECT_EQ(c.validation.validation_steps, p.validation);
    EXPECT_EQ(c.text_encoder.train_text_encoder, p.te_both);
    EXPECT_EQ(c.text_encoder.train_text_encoder_one_only, p.te_one);
    EXPECT_EQ(c.model.mixed_precision, "bf16");
  }
  // Every INI in configs/ parses (tiny-cpu.ini names its own model and data).
  int n = 0;
  for (const auto& name : list_directory(std::string(FLUXTRAIN_SOURCE_DIR) + "/configs")) {
    if (file_extension(name) != ".ini") continue;
    SCOPED_TRACE(name);
    EXPECT_NO_THROW(parse({"--config", std::string(FLUXTRAIN_SOURCE_DIR) + "/configs/" + name}));
    ++n;
  }
  EXPECT_EQ(n, 7);
}

TEST(TrainConfig, LaunchScriptsWrapThePresets) {
  const std::pair<const char*, const char*> scripts[] = {
      {"train_subject_with_text_encoder_fixed.sh", "configs/standard.ini"},
      {"train_subject_text_encoder_one_only.sh", "configs/text-encoder-one-only.ini"},
      {"train_subject_text_encoder_one_low_memory.sh", "configs/text-encoder-one-low-memory.ini"},
  };
  for (const auto& [script, ini] : scripts) {
    const std::string path = std::string(FLUXTRAIN_SOURCE_DIR) + "/launch/" + script;
    std::ifstream in(path);
    ASSERT_TRUE(in) << path;
    std::stringstream ss;
    ss << in.rdbuf();
    EXPECT_NE(ss.str().find(std::string("train --config \"$root/") + ini + "\" \"$@\""), std::string::npos) << path;
    // Running it with a bad flag reaches fluxtrain's validation (the wrapper passes "$@" on).
    std::string out;
    const int rc = run_command("FLUXTRAIN_BIN=" + std::string(FLUXTRAIN_BIN) + " bash " + path +
                                   " --pretrained_model_name_or_path m --train_data d.h5 --cond_size 100",
                               &out);
    EXPECT_EQ(rc, 2) << out;
    EXPECT_NE(out.find("--cond_size 100 is not a positive multiple of 16"), std::string::npos) << out;
  }
}

TEST(TrainBinary, BadFlagsExitNonZeroWithOneLineAndWriteNothing) {
  TempDir tmp;
  const std::string out_dir = tmp.path("out");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--train_text_encoder --train_text_encoder_one_only", "contradict each other"},
      {"--cond_size 24", "--cond_size 24 is not a positive multiple of 16"},
      {"--ranks 4 4 --network_alphas 4 4", "--ranks has 2 values, expected one per condition (--lora_num 1)"},
      {"--no_such_flag", "unknown option --no_such_flag"},
  };
  for (const auto& [flags, needle] : cases) {
    std::string out;
    const int rc = run_command(std::string(FLUXTRAIN_BIN) + " train --pretrained_model_name_or_path m --train_data d.h5 "
                                   "--output_dir " + out_dir + " " + flags,
                               &out);
    EXPECT_EQ(rc, 2) << flags;
    EXPECT_NE(out.find(needle), std::string::npos) << out;
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
    EXPECT_EQ(out.rfind("fluxtrain train: error: ", 0), 0u) << out;
    EXPECT_FALSE(path_exists(out_dir)) << flags;
  }
  std::string help;
  EXPECT_EQ(run_command(std::string(FLUXTRAIN_BIN) + " train --help", &help), 0);
  EXPECT_NE(help.find("--resume_from_checkpoint"), std::string::npos);
}

}  // namespace
}  // namespace fluxtrain
