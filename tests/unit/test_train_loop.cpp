// The training loop on the tiny model: the loss falls, accumulation and rank splits equal one big
// batch (float64), resume is bit-identical, a checkpoint killed between write and rename is
// ignored, non-finite updates are skipped, and bad data/checkpoints fail with one line, a
// non-zero exit and an untouched output directory.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <sys/stat.h>
#include <fstream>
#include <functional>
#include <sstream>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "train/run_config.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "data/dataset.h"
#include "data/synth_data.h"
#include "dist/low_memory_weights.h"
#include "dist/offloaded_weights.h"
#include "model/flux_weights.h"
#include "model/lora_io.h"
#include "support/test_util.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace fluxtrain {
namespace {

SynthSpec tiny_spec() {
  SynthSpec s;
  s.num_samples = 8;
  s.sizes = {8};
  s.cond_latent_size = 8;
  s.text_len = 4;
  return s;
}

void write_model(const std::string& file, const FluxConfig& cfg, uint64_t seed = 0) {
  save_bfl(file, cfg, init_random_weights(cfg, seed, at::kFloat));
}

RunConfig make_config(const std::vector<std::string>& args) {
  std::vector<const char*> argv{"train"};
  for (const auto& a : args) argv.push_back(a.c_str());
  std::ostringstream help;
  return parse_train_args(static_cast<int>(argv.size()), argv.data(), help).config;
}

struct TinyRun {
  TempDir tmp;
  std::string model = tmp.path("tiny.safetensors");
  std::string data = tmp.path("data.h5");
  std::string out = tmp.path("out");
  explicit TinyRun(const SynthSpec& spec = tiny_spec()) {
    write_model(model, FluxConfig::preset("tiny"));
    write_synthetic_dataset(data, spec);
  }
  // Base flags of these tests; a flag in `extra` replaces the base flag of the same name.
  std::vector<std::string> flags(const std::vector<std::string>& extra = {}) const {
    const std::vector<std::string> base = {
        "--pretrained_model_name_or_path", model, "--train_data", data, "--output_dir", out, "--mixed_precision", "no",
        "--device", "cpu", "--ranks", "4", "--network_alphas", "4", "--cond_size", "64", "--noise_size", "64",
        "--seed", "5", "--validation_steps", "0", "--max_grad_norm", "1e6", "--learning_rate", "1e-3"};
    auto split = [](const std::vector<std::string>& v) {
      std::vector<std::pair<std::string, std::vector<std::string>>> out;
      for (const auto& a : v) {
        if (a.rfind("--", 0) == 0) out.push_back({a, {}});
        else out.back().second.push_back(a);
      }
      return out;
    };
    auto merged = split(base);
    for (const auto& kv : split(extra)) {
      auto it = std::find_if(merged.begin(), merged.end(), [&](const auto& m) { return m.first == kv.first; });
      if (it != merged.end()) it->second = kv.second;
      else merged.push_back(kv);
    }
    std::vector<std::string> f;
    for (const auto& kv : merged) {
      f.push_back(kv.first);
      f.insert(f.end(), kv.second.begin(), kv.second.end());
    }
    return f;
  }
  std::string cli(const std::vector<std::string>& extra) const {
    std::string s = std::string(FLUXTRAIN_BIN) + " train";
    for (const auto& a : flags(extra)) s += " '" + a + "'";
    return s;
  }
};

TrainerOptions f64() {
  TrainerOptions o;
  o.compute_dtype = at::kDouble;
  o.tty = 0;
  return o;
}

double max_rel(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, rel_err(a[i], b[i]));
  return m;
}

std::vector<at::Tensor> grads(LoraSet& l) {
  std::vector<at::Tensor> g;
  for (const auto& p : l.parameters()) g.push_back(p.grad().defined() ? p.grad().clone() : at::zeros_like(p));
  return g;
}

std::vector<at::Tensor> params(LoraSet& l) {
  std::vector<at::Tensor> g;
  for (const auto& p : l.parameters()) g.push_back(p.detach().clone());
  return g;
}

Batch batch_of(const Dataset& ds, const std::vector<int64_t>& idx, int64_t epoch) {
  Batch b;
  b.epoch = epoch;
  for (int64_t i : idx) b.samples.push_back(ds.read(i));
  return b;
}

// Every file under dir (relative name -> mtime and content), to prove it was not touched.
// (POSIX, not std::filesystem: see core/fs.h.)
void snapshot_into(const std::string& dir, const std::string& rel, std::map<std::string, std::string>& s) {
  for (const auto& name : list_directory(dir)) {
    const std::string p = dir + "/" + name;
    struct stat st;
    if (::stat(p.c_str(), &st) != 0) continue;
    if (S_ISDIR(st.st_mode)) {
      snapshot_into(p, rel + name + "/", s);
    } else {
      s[rel + name] = std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec) + ":" +
                      read_text_file(p);
    }
  }
}

std::map<std::string, std::string> snapshot(const std::string& dir) {
  std::map<std::string, std::string> s;
  snapshot_into(dir, "", s);
  return s;
}

// Overfit: the same micro-batch again and again (same samples, so the same noise and timesteps)
// through the trainer's own update (loss, backward, clipping, AdamW). The condition LoRA must drive
// the loss on that batch down by at least half in a fixed number of CPU steps.
TEST(TrainLoop, OverfitAFixedBatchHalvesItsLoss) {
  TinyRun s;
  Trainer t(make_config(s.flags({"--ranks", "16", "--network_alphas", "16", "--learning_rate", "1e-2",
                                 "--max_grad_norm", "1"})),
            f64());
  const Batch b = batch_of(t.dataset(), {0, 1, 2, 3}, 0);
  double first = 0, last = 0;
  for (int i = 0; i < 150; ++i) {
    const StepResult r = t.train_step_on({b});
    if (i == 0) first = r.loss;
    last = r.loss;
  }
  std::cout << "fixed-batch loss " << first << " -> " << last << "\n";
  EXPECT_LT(last, 0.5 * first);
}

// The ordinary loop (fresh noise and timesteps every epoch): the validation loss on fixed draws
// falls clearly. It cannot fall much further: the noise in the target is unpredictable for a
// LoRA that only sees condition tokens, and neither can it cancel the random model's own output
// (docs/training.md has the numbers).
TEST(TrainLoop, ValidationLossFallsOnTheDataStream) {
  SynthSpec spec = tiny_spec();
  spec.num_samples = 16;
  TinyRun s(spec);
  TrainerOptions o;
  o.tty = 0;
  Trainer t(make_config(s.flags({"--ranks", "16", "--network_alphas", "16", "--train_batch_size", "4",
                                 "--learning_rate", "3e-2", "--max_grad_norm", "1", "--validation_samples", "8"})),
            o);
  const double before = t.validation_loss();
  for (int i = 0; i < 300; ++i) t.train_step();
  const double after = t.validation_loss();
  std::cout << "validation loss " << before << " -> " << after << "\n";
  EXPECT_LT(after, 0.8 * before);
}

TEST(TrainLoop, AccumulationAndRankSplitEqualOneBigBatchInFloat64) {
  SynthSpec spec = tiny_spec();
  spec.sizes = {8, 4, 8, 6};  // micro-batches mix latent sizes: grouped forwards
  spec.cond_latent_size = 0;
  TinyRun s(spec);
  Trainer big(make_config(s.flags({"--train_batch_size", "4"})), f64());
  Trainer acc(make_config(s.flags({"--train_batch_size", "1", "--gradient_accumulation_steps", "4"})), f64());
  // Two optimizer updates through the data stream (so that LoRA up is non-zero and every
  // gradient is), then the same LoRA weights in both.
  for (int i = 0; i < 2; ++i) {
    big.train_step();
    acc.train_step();
  }
  EXPECT_LT(max_rel(params(big.lora()), params(acc.lora())), 1e-12);
  EXPECT_EQ(big.state().micro_batch, 2);
  EXPECT_EQ(acc.state().micro_batch, 8);

  // Gradients of one batch of 4 == mean of 4 micro-batches of 1 == mean over 2 ranks of 2.
  const std::vector<int64_t> idx = {3, 0, 6, 5};
  for (auto p : big.lora().parameters()) p.mutable_grad().reset();
  for (auto p : acc.lora().parameters()) p.mutable_grad().reset();
  const double l_big = big.accumulate(batch_of(big.dataset(), idx, 1), 1.0);
  double l_acc = 0;
  for (int64_t i : idx) l_acc += acc.accumulate(batch_of(acc.dataset(), {i}, 1), 0.25) / 4;
  EXPECT_NEAR(l_big, l_acc, 1e-12 * l_big);
  const auto g_big = grads(big.lora()), g_acc = grads(acc.lora());
  double norm = 0;
  for (const auto& g : g_big) norm += g.norm().item<double>();
  EXPECT_GT(norm, 0);
  EXPECT_LT(max_rel(g_big, g_acc), 1e-12);

  TrainerOptions r0 = f64(), r1 = f64();
  r0.world_size = r1.world_size = 2;
  r1.rank = 1;
  Trainer rank0(make_config(s.flags({"--train_batch_size", "2"})), r0);
  Trainer rank1(make_config(s.flags({"--train_batch_size", "2"})), r1);
  rank0.lora().load_state(big.lora().state(), "test");
  rank1.lora().load_state(big.lora().state(), "test");
  rank0.accumulate(batch_of(rank0.dataset(), {3, 0}, 1), 0.5);
  rank1.accumulate(batch_of(rank1.dataset(), {6, 5}, 1), 0.5);
  auto g0 = grads(rank0.lora()), g1 = grads(rank1.lora());
  for (size_t i = 0; i < g0.size(); ++i) g0[i] = g0[i] + g1[i];
  EXPECT_LT(max_rel(g_big, g0), 1e-12);
}

TEST(TrainLoop, GradientCheckpointingGivesTheSameUpdate) {
  TinyRun s;
  Trainer a(make_config(s.flags({"--train_batch_size", "2", "--max_train_steps", "2"})), f64());
  Trainer b(make_config(s.flags({"--train_batch_size", "2", "--max_train_steps", "2", "--gradient_checkpointing"})), f64());
  for (int i = 0; i < 2; ++i) {
    a.train_step();
    b.train_step();
  }
  EXPECT_LT(max_rel(params(a.lora()), params(b.lora())), 1e-12);
}

TEST(TrainLoop, ResumeIsBitIdenticalAndAKilledCheckpointIsIgnored) {
  TinyRun s;
  const std::vector<std::string> common = {"--train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                           "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--max_train_steps",
                                           "8", "--checkpointing_steps", "4", "--weighting_scheme", "logit_normal",
                                           "--validation_steps", "3", "--validation_samples", "2", "--num_threads", "1",
                                           "--max_grad_norm", "0.05"};
  // A: 8 updates straight.
  std::vector<std::string> a = common;
  a.insert(a.end(), {"--output_dir", s.tmp.path("a"), "--checkpoints_total_limit", "1"});
  std::string log;
  ASSERT_EQ(run_command(s.cli(a), &log), 0) << log;
  EXPECT_EQ(list_checkpoints(s.tmp.path("a")).size(), 1u);  // pruned to the newest
  EXPECT_TRUE(path_exists(s.tmp.path("a/checkpoint-8.h5")));

  // B: the same run killed while writing checkpoint 8 (after the temp file, before the rename).
  std::vector<std::string> b = common;
  b.insert(b.end(), {"--output_dir", s.tmp.path("b")});
  const int rc = run_command("FLUXTRAIN_TEST_ABORT_BEFORE_RENAME=8 " + s.cli(b), &log);
  ASSERT_EQ(rc, 134) << log;
  EXPECT_FALSE(path_exists(s.tmp.path("b/checkpoint-8.h5")));
  bool temp_left = false;
  for (const auto& name : list_directory(s.tmp.path("b"))) temp_left |= name.rfind("checkpoint-8.h5.tmp.", 0) == 0;
  EXPECT_TRUE(temp_left);
  EXPECT_EQ(latest_checkpoint(s.tmp.path("b")), s.tmp.path("b/checkpoint-4.h5"));
  const Checkpoint ck4 = load_checkpoint(s.tmp.path("b/checkpoint-4.h5"));  // the previous one loads
  EXPECT_EQ(ck4.state.step, 4);
  EXPECT_EQ(ck4.state.micro_batch, 8);

  // ... resumed from `latest`: 4 more updates.
  b.insert(b.end(), {"--resume_from_checkpoint", "latest"});
  ASSERT_EQ(run_command(s.cli(b), &log), 0) << log;
  EXPECT_NE(log.find("resumed from " + s.tmp.path("b/checkpoint-4.h5") + " at step 4"), std::string::npos) << log;

  const TensorMap la = safetensors::load(s.tmp.path("a/lora.safetensors"));
  const TensorMap lb = safetensors::load(s.tmp.path("b/lora.safetensors"));
  ASSERT_EQ(la.size(), lb.size());
  for (const auto& kv : la) EXPECT_TRUE(at::equal(kv.second, lb.at(kv.first))) << kv.first;
  const Checkpoint ca = load_checkpoint(s.tmp.path("a/checkpoint-8.h5"));
  const Checkpoint cb = load_checkpoint(s.tmp.path("b/checkpoint-8.h5"));
  for (const auto& kv : ca.optimizer) EXPECT_TRUE(at::equal(kv.second, cb.optimizer.at(kv.first))) << kv.first;
  EXPECT_EQ(ca.state.micro_batch, 16);
  EXPECT_EQ(cb.state.micro_batch, 16);
  // The LoRA actually moved, and the EasyControl keys are there.
  EXPECT_GT(la.at("transformer_blocks.0.attn.processor.q_loras.0.up.weight").abs().max().item<double>(), 0);
  EXPECT_TRUE(la.count("single_transformer_blocks.1.attn.processor.v_loras.0.down.weight"));

  // metrics.jsonl: every step exactly once, in order, after the resume too.
  std::ifstream in(s.tmp.path("b/metrics.jsonl"));
  std::vector<int64_t> steps;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    steps.push_back(j.at("step"));
    for (const char* k : {"loss", "lr", "grad_norm", "s_per_step", "epoch"}) EXPECT_TRUE(j.contains(k)) << k;
    if (j["step"] == 3 || j["step"] == 6) EXPECT_TRUE(j.contains("val_loss")) << line;
  }
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8}));
}

TEST(TrainLoop, NonFiniteUpdatesAreSkippedAndTooManyInARowStop) {
  TempDir tmp;
  // Sample 2 carries a NaN: the update that meets it is skipped, training goes on.
  SynthSpec spec = tiny_spec();
  DatasetSpec ds;
  ds.text_len = spec.text_len;
  ds.text_dim = 32;
  ds.pooled_dim = 16;
  ds.cond_kinds = {"spatial"};
  {
    DatasetWriter w(tmp.path("nan.h5"), ds);
    for (int64_t i = 0; i < spec.num_samples; ++i) {
      Sample x = synthetic_sample(spec, i);
      if (i == 2) x.target[0][1][1].fill_(std::nan(""));
      w.add(x);
    }
    w.finish();
  }
  TinyRun s;
  Trainer t(make_config(s.flags({"--train_batch_size", "1", "--max_train_steps", "10", "--train_data",
                                  tmp.path("nan.h5")})),
            f64());
  int skipped = 0, done = 0;
  while (t.state().step < 10) {
    const StepResult r = t.train_step();
    skipped += r.skipped;
    done += !r.skipped;
    ASSERT_LT(skipped + done, 30);
  }
  EXPECT_GE(skipped, 1);
  EXPECT_EQ(t.state().nonfinite_total, skipped);
  for (const auto& p : t.lora().parameters()) EXPECT_TRUE(at::isfinite(p).all().item<bool>());

  // Every sample NaN: stop after --max_nonfinite_steps in a row, non-zero exit, one line.
  {
    DatasetWriter w(tmp.path("allnan.h5"), ds);
    for (int64_t i = 0; i < 4; ++i) {
      Sample x = synthetic_sample(spec, i);
      x.target.fill_(std::nan(""));
      w.add(x);
    }
    w.finish();
  }
  std::string log;
  const int rc = run_command(s.cli({"--train_data", tmp.path("allnan.h5"), "--max_nonfinite_steps", "3",
                                    "--max_train_steps", "5", "--output_dir", tmp.path("o2")}) ,
                             &log);
  EXPECT_EQ(rc, 2) << log;
  EXPECT_NE(log.find("stopping: 3 updates in a row had a non-finite loss or gradient"), std::string::npos) << log;
}

TEST(TrainLoop, StandardModeTrainsAndWritesPeftKeys) {
  TinyRun s;
  std::string log;
  ASSERT_EQ(run_command(s.cli({"--lora_mode", "standard", "--lora_targets", "to_q,to_v,proj_out", "--max_train_steps",
                               "3", "--train_batch_size", "2"}),
                        &log),
            0)
      << log;
  const TensorMap l = safetensors::load(s.out + "/lora.safetensors");
  EXPECT_TRUE(l.count("transformer.transformer_blocks.0.attn.to_q.lora_A.weight")) << l.begin()->first;
  EXPECT_TRUE(l.count("transformer.single_transformer_blocks.1.proj_out.lora_B.weight"));
  EXPECT_NE(log.rfind(s.out + "/lora.safetensors\n"), std::string::npos);  // the path is the last line
}

TEST(TrainBinary, BadDataAndCheckpointsFailWithOneLineAndNoDamage) {
  TinyRun s;
  // A finished run whose output directory must survive every failed attempt below unchanged.
  std::string log;
  ASSERT_EQ(run_command(s.cli({"--max_train_steps", "2", "--checkpointing_steps", "1"}), &log), 0) << log;
  const auto before = snapshot(s.out);
  ASSERT_TRUE(before.count("checkpoint-2.h5"));

  TempDir tmp;
  std::ofstream(tmp.path("garbage.h5")) << "not an hdf5 file";
  {
    DatasetSpec spec;
    spec.text_len = 4;
    spec.text_dim = 32;
    spec.pooled_dim = 16;
    spec.cond_kinds = {"spatial"};
    DatasetWriter w(tmp.path("empty.h5"), spec);
    w.finish();
  }
  SynthSpec two = tiny_spec();
  two.num_conditions = 2;
  write_synthetic_dataset(tmp.path("two.h5"), two);
  FluxConfig bigger = FluxConfig::preset("tiny");
  bigger.hidden_size = 96;
  bigger.num_heads = 4;
  bigger.axes_dim = {8, 8, 8};
  write_model(tmp.path("bigger.safetensors"), bigger);

  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--train_data", tmp.path("missing.h5")}, tmp.path("missing.h5") + ": no such file"},
      {{"--train_data", tmp.path("garbage.h5")}, tmp.path("garbage.h5") + ": not an HDF5 file"},
      {{"--train_data", tmp.path("empty.h5")}, tmp.path("empty.h5") + ": dataset has no samples"},
      {{"--train_data", tmp.path("two.h5")}, "has 2 condition column(s), but --lora_num is 1"},
      {{"--noise_size", "32"}, "exceed --noise_size 32"},
      {{"--pretrained_model_name_or_path", tmp.path("bigger.safetensors"), "--resume_from_checkpoint",
        s.out + "/checkpoint-2.h5"},
       s.out + "/checkpoint-2.h5: checkpoint is for another model size (hidden 64"},
      {{"--pretrained_model_name_or_path", tmp.path("bigger.safetensors"), "--resume_from_checkpoint", "latest"},
       "checkpoint is for another model size"},
      {{"--ranks", "8", "--network_alphas", "8", "--resume_from_checkpoint", "latest"}, "(different --ranks?)"},
      {{"--resume_from_checkpoint", tmp.path("nope.h5")}, "--resume_from_checkpoint: " + tmp.path("nope.h5") + ": no such file"},
      {{"--resume_from_checkpoint", tmp.path("garbage.h5")}, "not an HDF5 file"},
      {{"--resume_from_checkpoint", "latest", "--seed", "6"}, "--seed 6 differs from the seed 5"},
      {{"--pretrained_model_name_or_path", tmp.path("nomodel")}, "--pretrained_model_name_or_path"},
  };
  for (const auto& [extra, needle] : cases) {
    const int rc = run_command(s.cli(extra), &log);
    EXPECT_EQ(rc, 2) << needle << "\n" << log;
    EXPECT_NE(log.find(needle), std::string::npos) << log;
    EXPECT_EQ(std::count(log.begin(), log.end(), '\n'), 1) << log;
    EXPECT_EQ(snapshot(s.out), before) << needle;
  }
  // A fresh output directory is not even created when the input is bad.
  EXPECT_EQ(run_command(s.cli({"--train_data", tmp.path("garbage.h5"), "--output_dir", tmp.path("fresh")}), &log), 2);
  EXPECT_FALSE(path_exists(tmp.path("fresh")));
}

}  // namespace
}  // namespace fluxtrain

namespace fluxtrain {
namespace {

// --block_major_accumulation (train/block_major_step.h): the k micro-batches of an update in one
// block-major forward and one backward give the ordinary order's update (float64: the same
// draws, the same loss scaling; only sums are ordered differently), with and without
// checkpointing, with shape groups inside micro-batches, with streamed blocks, and with a
// non-finite micro-batch (the same updates are skipped).
TEST(TrainLoop, BlockMajorAccumulationEqualsOrdinaryInFloat64) {
  SynthSpec spec = tiny_spec();
  spec.sizes = {8, 4, 8, 6};  // micro-batches of 2 mix latent sizes: several groups per micro-batch
  spec.cond_latent_size = 0;
  TinyRun mixed(spec);
  TinyRun plain;  // with a condition per sample (EasyControl's condition stream)
  const std::vector<std::string> acc = {"--train_batch_size", "2", "--gradient_accumulation_steps", "3"};
  struct Case {
    const char* what;
    TinyRun* run;
    std::vector<std::string> extra;
  };
  const std::vector<Case> cases = {
      {"mixed sizes", &mixed, {}},
      {"mixed sizes, checkpointing", &mixed, {"--gradient_checkpointing"}},
      {"conditions", &plain, {}},
      {"conditions, 3 blocks streamed", &plain, {"--blocks_to_swap", "3"}},
      {"conditions, all streamed, checkpointing", &plain, {"--blocks_to_swap", "-1", "--gradient_checkpointing"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    std::vector<std::string> f = acc;
    f.insert(f.end(), c.extra.begin(), c.extra.end());
    Trainer ordinary(make_config(c.run->flags(f)), f64());
    f.push_back("--block_major_accumulation");
    Trainer block_major(make_config(c.run->flags(f)), f64());
    for (int i = 0; i < 2; ++i) {
      const StepResult a = ordinary.train_step();
      const StepResult b = block_major.train_step();
      EXPECT_FALSE(a.skipped || b.skipped);
      EXPECT_NEAR(b.loss, a.loss, 1e-12 * std::abs(a.loss));
      EXPECT_NEAR(b.grad_norm, a.grad_norm, 1e-12 * std::abs(a.grad_norm));
    }
    EXPECT_EQ(block_major.state().micro_batch, 6);
    EXPECT_LT(max_rel(params(block_major.lora()), params(ordinary.lora())), 1e-12);
    double up = 0;
    for (const auto& a : block_major.lora().adapters()) up = std::max(up, a.up.abs().max().item<double>());
    EXPECT_GT(up, 0) << "the LoRA did not move: the comparison proves nothing";
  }
}

TEST(TrainLoop, BlockMajorAccumulationSkipsTheSameNonFiniteUpdates) {
  TempDir tmp;
  SynthSpec spec = tiny_spec();
  DatasetSpec ds;
  ds.text_len = spec.text_len;
  ds.text_dim = 32;
  ds.pooled_dim = 16;
  ds.cond_kinds = {"spatial"};
  {
    DatasetWriter w(tmp.path("nan.h5"), ds);
    for (int64_t i = 0; i < spec.num_samples; ++i) {
      Sample x = synthetic_sample(spec, i);
      if (i == 4) x.target[0][1][1].fill_(std::nan(""));
      w.add(x);
    }
    w.finish();
  }
  TinyRun s;
  const std::vector<std::string> f = {"--train_batch_size", "1", "--gradient_accumulation_steps", "3", "--train_data",
                                      tmp.path("nan.h5")};
  Trainer ordinary(make_config(s.flags(f)), f64());
  std::vector<std::string> g = f;
  g.push_back("--block_major_accumulation");
  Trainer block_major(make_config(s.flags(g)), f64());
  int skipped = 0;
  for (int i = 0; i < 4; ++i) {
    const StepResult a = ordinary.train_step();
    const StepResult b = block_major.train_step();
    EXPECT_EQ(a.skipped, b.skipped) << "update " << i;
    skipped += b.skipped;
  }
  EXPECT_GE(skipped, 1);
  EXPECT_EQ(block_major.state().step, ordinary.state().step);
  EXPECT_LT(max_rel(params(block_major.lora()), params(ordinary.lora())), 1e-12);
  for (const auto& p : block_major.lora().parameters()) EXPECT_TRUE(at::isfinite(p).all().item<bool>());
}

// With every block streamed, an ordinary update with k micro-batches streams the model k times;
// block-major streams it once, as an update of one micro-batch does.
TEST(TrainLoop, BlockMajorAccumulationStreamsEachBlockOncePerUpdate) {
  TinyRun s;
  for (bool ckpt : {false, true}) {
    SCOPED_TRACE(ckpt ? "checkpointing" : "no checkpointing");
    std::vector<std::string> base = {"--train_batch_size", "1", "--blocks_to_swap", "-1", "--offload_prefetch", "1"};
    if (ckpt) base.push_back("--gradient_checkpointing");
    auto with = [&](std::vector<std::string> extra) {
      std::vector<std::string> f = base;
      f.insert(f.end(), extra.begin(), extra.end());
      return make_config(s.flags(f));
    };
    Trainer one(with({"--gradient_accumulation_steps", "1"}), f64());
    Trainer ordinary(with({"--gradient_accumulation_steps", "3"}), f64());
    Trainer block_major(with({"--gradient_accumulation_steps", "3", "--block_major_accumulation"}), f64());
    auto copies_of_second_update = [](Trainer& t) {
      t.train_step();
      const dist::OffloadStats* st = dist::find_offload_stats(t.block_weights());
      EXPECT_NE(st, nullptr);
      if (!st) return int64_t{0};
      const int64_t before = st->copies;
      t.train_step();
      return st->copies - before;
    };
    const int64_t c1 = copies_of_second_update(one), ck = copies_of_second_update(ordinary),
                  cb = copies_of_second_update(block_major);
    std::cout << "block copies per update: k=1 " << c1 << ", k=3 ordinary " << ck << ", k=3 block-major " << cb
              << "\n";
    const int n = static_cast<int>(one.model_config().num_blocks());
    EXPECT_GE(c1, n);  // forward streams every block at least once
    EXPECT_EQ(cb, c1);
    EXPECT_GE(ck, 3 * c1 - 6);  // each micro-batch streams the model (a few turn-around blocks reused)
  }
}

}  // namespace
}  // namespace fluxtrain
