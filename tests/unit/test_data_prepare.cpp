// fluxtrain prepare and the data side it feeds: aspect buckets, the bucketed batch order,
// augmentation draws independent of batch layout and ranks, bad-line handling (skip/fail),
// incremental re-runs, interruption, and images -> prepare -> train on the tiny model.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <map>
#include <set>

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/rng.h"
#include "data/augment.h"
#include "data/buckets.h"
#include "data/dataset.h"
#include "data/image_io.h"
#include "data/online_vae.h"
#include "data/prepare.h"
#include "cli/prepare_text_encoders.h"
#include "encoders/text_encoders.h"
#include "encoders/tiny_text_encoders.h"
#include "train/online_latents.h"
#include "encoders/autoencoder_weights.h"
#include "model/flux_weights.h"
#include "support/test_util.h"

namespace fluxtrain {
namespace {

// A smooth random picture: [h, w, 3] uint8.
at::Tensor picture(int64_t h, int64_t w, uint64_t seed) {
  at::Generator g = cpu_generator(seed);
  at::Tensor small = at::rand({1, 3, 4, 4}, g) * 255;
  return at::upsample_bilinear2d(small, {h, w}, false)[0].permute({1, 2, 0}).round().clamp(0, 255).to(at::kByte).contiguous();
}

void write_lines(const std::string& path, const std::vector<std::string>& lines) {
  std::ofstream f(path);
  for (const auto& l : lines) f << l << "\n";
}

std::string read_bytes(const std::string& p) { return read_text_file(p); }

int64_t mtime_ns(const std::string& p) {
  struct stat st;
  ::stat(p.c_str(), &st);
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

// Deterministic stand-in for the text encoders (test only): embeddings from the caption bytes.
TextEncoderHook stand_in_text() {
  TextEncoderHook h;
  h.text_len = 8;
  h.text_dim = 32;   // tiny model's context_in_dim
  h.pooled_dim = 16;  // tiny model's vec_in_dim
  h.identity = "test-stand-in-1";
  h.encode = [](const std::vector<std::string>& caps) {
    std::vector<at::Tensor> t5, pooled;
    for (const auto& c : caps) {
      uint64_t s = 1469598103934665603ULL;
      for (unsigned char ch : c) s = (s ^ ch) * 1099511628211ULL;
      at::Generator g = cpu_generator(s);
      t5.push_back(at::randn({8, 32}, g));
      pooled.push_back(at::randn({16}, g));
    }
    return TextEmbeddings{at::stack(t5), at::stack(pooled)};
  };
  return h;
}

// A fixture folder: tiny autoencoder + transformer, images, and a jsonl with good and bad lines.
struct Fixture {
  TempDir tmp;
  std::string model = tmp.path("model");
  std::string jsonl = tmp.path("data/train.jsonl");
  std::string out = tmp.path("out.h5");
  Fixture() {
    make_directories(tmp.path("data/img"));
    write_random_autoencoder(model, "tiny", 0, at::kFloat, "bfl");
    save_png(tmp.path("data/img/t1.png"), picture(48, 64, 1));
    save_png(tmp.path("data/img/t2.png"), picture(80, 48, 2));
    save_png(tmp.path("data/img/t3.png"), picture(70, 70, 3));
    save_png(tmp.path("data/img/t4.png"), picture(64, 96, 4));
    save_png(tmp.path("data/img/c1.png"), picture(40, 40, 5));
    save_png(tmp.path("data/img/c2.png"), picture(24, 48, 6));
    const std::string png = read_bytes(tmp.path("data/img/t3.png"));
    std::ofstream(tmp.path("data/img/trunc.png"), std::ios::binary) << png.substr(0, png.size() / 2);
    write_lines(jsonl, {
        R"({"source": "img/c1.png", "caption": "a red cube", "target": "img/t1.png"})",    // 1
        R"({"source": "img/c2.png", "caption": "a tall one", "target": "img/t2.png"})",    // 2
        R"({"source": "img/c1.png", "caption": )",                                          // 3 bad JSON
        R"({"source": "img/c1.png", "caption": "missing", "target": "img/nope.png"})",     // 4 missing file
        R"({"source": "img/c1.png", "caption": "cut off", "target": "img/trunc.png"})",    // 5 truncated
        R"({"source": "img/c1.png", "caption": "", "target": "img/t3.png"})",              // 6 empty caption
        R"({"source": ["img/c1.png", "img/c2.png"], "caption": "two", "target": "img/t3.png"})",  // 7 count
        R"({"source": "img/c2.png", "caption": "square", "target": "img/t3.png"})",        // 8
        "",                                                                                 // 9 blank
        R"({"source": "img/c1.png", "caption": "wide", "target": "img/t4.png"})",          // 10
    });
  }
  PrepareOptions options(const std::string& mode = "skip") const {
    PrepareOptions o;
    o.model = model;
    o.jsonl = jsonl;
    o.output = out;
    o.spatial_column = "source";
    o.lora_num = 1;
    o.noise_size = 64;
    o.cond_size = 32;
    o.cache_latents = true;
    o.on_bad_sample = mode;
    o.tty = 0;
    o.log = std::tmpfile();
    return o;
  }
};

// ---------------------------------------------------------------------------------------------
TEST(Buckets, AreaSidesAndBoundedAspectError) {
  for (int64_t noise : {64, 512, 1024}) {
    const auto b = make_buckets(noise, 4.0);
    ASSERT_FALSE(b.empty());
    std::vector<double> logs;
    for (const auto& x : b) {
      EXPECT_LE(x.width * x.height, noise * noise);
      EXPECT_EQ(x.width % 16, 0);
      EXPECT_EQ(x.height % 16, 0);
      EXPECT_LE(std::max(x.width, x.height), 4 * std::min(x.width, x.height));
      logs.push_back(std::log(static_cast<double>(x.width) / x.height));
    }
    EXPECT_NE(std::find(b.begin(), b.end(), Bucket{noise, noise}), b.end()) << "square bucket at " << noise;
    double max_gap = 0;
    for (size_t i = 1; i < logs.size(); ++i) max_gap = std::max(max_gap, logs[i] - logs[i - 1]);
    // Every aspect ratio inside the bucket range lands within half the largest gap.
    ScalarRng rng(noise);
    for (int i = 0; i < 2000; ++i) {
      const int64_t w = 10 + static_cast<int64_t>(rng.uniform() * 3000), h = 10 + static_cast<int64_t>(rng.uniform() * 3000);
      const double r = std::log(static_cast<double>(w) / h);
      const Bucket& c = b[choose_bucket(b, w, h)];
      const double err = std::abs(std::log(static_cast<double>(c.width) / c.height) - r);
      const double outside = std::max({0.0, r - logs.back(), logs.front() - r});
      EXPECT_LE(err, std::max(max_gap / 2 + 1e-9, outside + 1e-9)) << w << "x" << h << " at " << noise;
    }
    if (noise == 1024) EXPECT_LT(max_gap, 0.07);  // fine grid at FLUX size: aspect error < 3.5%
  }
  const at::Tensor img = picture(100, 50, 1);
  const at::Tensor fit = fit_to_bucket(img, {32, 64});
  EXPECT_EQ(fit.sizes(), (std::vector<int64_t>{64, 32, 3}));
  EXPECT_THROW(make_buckets(8), Error);
}

TEST(BucketOrder, BatchesNeverMixBucketsSameSeedSameBatchesRanksAgree) {
  std::vector<int64_t> bucket;
  for (int i = 0; i < 61; ++i) bucket.push_back(i % 3 == 0 ? 0 : (i % 3 == 1 ? 5 : 2));
  const int64_t B = 2;
  const int W = 3;
  for (int64_t epoch : {0, 1, 7}) {
    std::vector<DataOrder> ranks;
    for (int r = 0; r < W; ++r) ranks.emplace_back(bucket, B, r, W, 42);
    const int64_t per = ranks[0].micro_batches_per_epoch();
    EXPECT_EQ(per, 3 * (20 / (B * W)) + 0) << "each bucket's remainder is left out";
    std::set<int64_t> seen;
    for (int64_t m = epoch * per; m < (epoch + 1) * per; ++m) {
      std::set<int64_t> buckets_in_batch;
      for (int r = 0; r < W; ++r)
        for (int64_t i : ranks[r].indices(m)) {
          buckets_in_batch.insert(bucket[static_cast<size_t>(i)]);
          EXPECT_TRUE(seen.insert(i).second) << "sample twice in an epoch";
        }
      EXPECT_EQ(buckets_in_batch.size(), 1u) << "micro-batch " << m << " mixes buckets";
    }
    // Same seed: same batches (a fresh order object, another rank count's view of epoch order).
    DataOrder again(bucket, B, 1, W, 42);
    for (int64_t m = epoch * per; m < (epoch + 1) * per; ++m) EXPECT_EQ(again.indices(m), ranks[1].indices(m));
  }
  EXPECT_NE(DataOrder(bucket, B, 0, W, 42).permutation(0), DataOrder(bucket, B, 0, W, 43).permutation(0));
  EXPECT_NE(DataOrder(bucket, B, 0, W, 42).permutation(0), DataOrder(bucket, B, 0, W, 42).permutation(1));
  EXPECT_THROW(DataOrder(std::vector<int64_t>{0, 1, 2}, 2, 0, 1, 1), Error);
}

TEST(Augment, DrawsDependOnSeedEpochAndSampleOnly) {
  const SampleDraws a = draw_sample(3, 2, 17, 0.1, {1, 4});
  // Other draws in between change nothing (no shared state).
  for (int i = 0; i < 5; ++i) draw_sample(3, 2, static_cast<uint64_t>(i), 0.1, {1, 4});
  const SampleDraws b = draw_sample(3, 2, 17, 0.1, {1, 4});
  EXPECT_EQ(a.drop_caption, b.drop_caption);
  EXPECT_EQ(a.variant, b.variant);
  for (size_t k = 0; k < 2; ++k) {
    EXPECT_EQ(a.subject[k].flip, b.subject[k].flip);
    EXPECT_EQ(a.subject[k].angle_deg, b.subject[k].angle_deg);
  }
  // Statistics of the EasyControl draws: flip p = 0.7, angle in [-20, 20], dropout p = 0.1.
  int flips = 0, drops = 0;
  double max_angle = 0;
  std::set<int64_t> variants;
  for (uint64_t i = 0; i < 4000; ++i) {
    const SampleDraws d = draw_sample(9, i % 5, i, 0.1, {4});
    flips += d.subject[0].flip;
    drops += d.drop_caption;
    max_angle = std::max(max_angle, std::abs(d.subject[0].angle_deg));
    variants.insert(d.variant[0]);
  }
  EXPECT_NEAR(flips / 4000.0, 0.7, 0.03);
  EXPECT_NEAR(drops / 4000.0, 0.1, 0.02);
  EXPECT_LE(max_angle, 20.0);
  EXPECT_GT(max_angle, 19.0);
  EXPECT_EQ(variants, (std::set<int64_t>{0, 1, 2, 3}));

  // The subject transform: fitted (longer side = cond), centred padding with 0.
  const at::Tensor img = picture(30, 60, 2);
  const at::Tensor s = subject_condition(img, 32, nullptr);
  EXPECT_EQ(s.sizes(), (std::vector<int64_t>{32, 32, 3}));
  EXPECT_EQ(s.narrow(0, 0, 8).max().item<int>(), 0) << "top padding";
  EXPECT_GT(s.narrow(0, 8, 16).max().item<int>(), 0);
  SubjectAugment flip{true, 0.0};
  EXPECT_TRUE(at::equal(subject_condition(img, 32, &flip), s.flip({1})));
  EXPECT_TRUE(at::equal(rotate_nearest(img, 0.0), img));
}

// Same (seed, epoch, sample) -> same sample as training sees it, whatever the batch layout and
// the number of ranks: a pixel dataset (subject augmentation applied when read) and a cached
// dataset with variants, read through prefetchers of different layouts.
TEST(Augment, ReadIsIndependentOfBatchLayoutAndRankCount) {
  if (!image_files_supported()) GTEST_SKIP() << "built without libvips";
  Fixture fx;
  write_lines(fx.jsonl, {R"({"s": "img/c1.png", "caption": "a", "target": "img/t1.png"})",
                         R"({"s": "img/c2.png", "caption": "b", "target": "img/t3.png"})",
                         R"({"s": "img/c1.png", "caption": "c", "target": "img/t4.png"})",
                         R"({"s": "img/c2.png", "caption": "d", "target": "img/t2.png"})"});
  for (bool cache : {false, true}) {
    PrepareOptions o = fx.options();
    o.spatial_column = "None";
    o.subject_column = "s";
    o.cache_latents = cache;
    o.augment_variants = 3;
    o.caption_dropout = 0.5;
    o.output = fx.tmp.path(cache ? "cached.h5" : "pixels.h5");
    prepare_dataset(o);
    Dataset ds(o.output);
    EXPECT_EQ(ds.info().storage, cache ? "latents" : "pixels");
    EXPECT_EQ(ds.info().cond_variants, (std::vector<int64_t>{cache ? 3 : 1}));
    std::map<std::pair<int64_t, int64_t>, Sample> first;  // (epoch, sample) -> as read
    auto key_tensor = [&](const Sample& s) { return cache ? s.conds[0] : s.cond_pixels[0]; };
    for (auto [batch, world] : std::vector<std::pair<int64_t, int>>{{1, 1}, {2, 1}, {1, 2}, {2, 2}}) {
      for (int r = 0; r < world; ++r) {
        DataOrder order(ds.size(), batch, r, world, 11);
        Prefetcher p(ds, order, 0, 2);
        for (int64_t m = 0; m < 3 * order.micro_batches_per_epoch(); ++m) {
          Batch b = p.next();
          for (const Sample& s : b.samples) {
            auto it = first.find({b.epoch, s.index});
            if (it == first.end()) {
              first.emplace(std::make_pair(b.epoch, s.index), s);
              continue;
            }
            EXPECT_TRUE(at::equal(key_tensor(s), key_tensor(it->second))) << "epoch " << b.epoch << " sample " << s.index;
            EXPECT_EQ(s.caption, it->second.caption);
          }
        }
      }
    }
    // The draws do vary over epochs and samples.
    std::set<std::string> captions;
    int differing = 0;
    for (const auto& kv : first) {
      captions.insert(kv.second.caption);
      auto other = first.find({kv.first.first + 1, kv.first.second});
      if (other != first.end() && !at::equal(key_tensor(kv.second), key_tensor(other->second))) ++differing;
    }
    EXPECT_TRUE(captions.count(" ")) << "caption dropout never drawn";
    EXPECT_GT(differing, 0) << "subject condition never changes between epochs";
    if (!cache) {
      // The VAE-online path: latents from the pixels, like cached ones.
      LoadedAutoencoder la = load_autoencoder(fx.model);
      Autoencoder ae(la.config, la.weights);
      std::vector<Sample> batch{ds.read(0, 11, 0), ds.read(1, 11, 0)};
      encode_latents_online(ae, batch);
      const at::Tensor want = ae.encode(batch[0].target_pixels.unsqueeze(0).to(at::kFloat).div(127.5).sub(1))[0];
      EXPECT_LT(rel_err(batch[0].target, want), 1e-6);
      EXPECT_EQ(batch[1].conds[0].sizes(), (std::vector<int64_t>{16, 4, 4}));
    }
  }
}

// ---------------------------------------------------------------------------------------------
TEST(Prepare, SkipReportsEachBadLineAndWritesTheRest) {
  if (!image_files_supported()) GTEST_SKIP() << "built without libvips";
  Fixture fx;
  const PrepareSummary s = prepare_dataset(fx.options("skip"));
  std::map<int64_t, std::string> bad;
  for (const auto& b : s.bad) bad[b.line] = b.path + ": " + b.reason;
  ASSERT_EQ(bad.size(), 5u) << format_summary(s, fx.out);
  EXPECT_NE(bad[3].find("bad JSON"), std::string::npos) << bad[3];
  EXPECT_NE(bad[4].find("nope.png: no such file"), std::string::npos) << bad[4];
  EXPECT_NE(bad[5].find("trunc.png: cannot decode image"), std::string::npos) << bad[5];
  EXPECT_NE(bad[6].find("empty caption"), std::string::npos) << bad[6];
  EXPECT_NE(bad[7].find("has 2 images in 'source'"), std::string::npos) << bad[7];
  EXPECT_EQ(s.written, 4);
  EXPECT_EQ(s.lines, 9);
  Dataset ds(fx.out);
  EXPECT_EQ(ds.size(), 4);
  EXPECT_TRUE(ds.info().bucketed);
  EXPECT_FALSE(ds.info().has_text_embeddings);
  EXPECT_EQ(ds.info().cond_kinds, (std::vector<std::string>{"spatial"}));
  EXPECT_NEAR(ds.info().caption_dropout, 0.1, 1e-12);
  const std::vector<std::string> captions{"a red cube", "a tall one", "square", "wide"};
  for (int64_t i = 0; i < 4; ++i) {
    const Sample x = ds.read(i);
    EXPECT_EQ(x.caption, captions[static_cast<size_t>(i)]);
    EXPECT_EQ(x.target.size(0), 16);
    EXPECT_LE(x.target.size(1) * x.target.size(2) * 64, 64 * 64);
    EXPECT_EQ(x.conds[0].sizes(), (std::vector<int64_t>{16, 4, 4}));
    EXPECT_FALSE(x.t5.defined());
  }
  // Buckets follow the aspect ratio: t2 is tall (48x80 -> taller than wide), t4 wide.
  EXPECT_GT(ds.read(1).target.size(1), ds.read(1).target.size(2));
  EXPECT_LT(ds.read(3).target.size(1), ds.read(3).target.size(2));
  const std::string text = format_summary(s, fx.out);
  EXPECT_NE(text.find("skipped line 5"), std::string::npos) << text;
  EXPECT_NE(text.find("buckets:"), std::string::npos) << text;
  // A dataset without text embeddings is refused by a run that does not encode captions.
  try {
    ds.check_compatible(FluxConfig::preset("tiny"), 1, 64, 32);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no cached text embeddings"), std::string::npos) << e.what();
  }
  ds.check_compatible(FluxConfig::preset("tiny"), 1, 64, 32, /*text_online=*/true);
}

TEST(Prepare, FailWritesNothingAndKeepsTheOldDataset) {
  if (!image_files_supported()) GTEST_SKIP() << "built without libvips";
  Fixture fx;
  prepare_dataset(fx.options("skip"));
  const std::string before = read_bytes(fx.out);
  try {
    prepare_dataset(fx.options("fail"));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("5 bad line(s)"), std::string::npos) << m;
    EXPECT_NE(m.find("nothing written"), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos);
  }
  EXPECT_EQ(read_bytes(fx.out), before);
  EXPECT_EQ(list_directory(fx.tmp.dir()).size(), 3u) << "a temp file was left behind";  // data, model, out.h5
  // Through the command line: exit 2, one error line, the old dataset untouched.
  std::string log;
  const int rc = run_command(std::string(FLUXTRAIN_BIN) + " prepare --train_data_dir " + fx.jsonl + " --output " + fx.out +
                                 " --pretrained_model_name_or_path " + fx.model +
                                 " --spatial_column source --noise_size 64 --cond_size 32 --cache_latents"
                                 " --on_bad_sample fail",
                             &log);
  EXPECT_EQ(rc, 2) << log;
  EXPECT_NE(log.find("fluxtrain prepare: error: " + fx.jsonl + ": 5 bad line(s)"), std::string::npos) << log;
  EXPECT_NE(log.find(fx.jsonl + ":7: "), std::string::npos) << "each bad line is reported: " << log;
  EXPECT_EQ(read_bytes(fx.out), before);
}

TEST(Prepare, RerunIsNoOpAndAChangeReencodesOnlyWhatChanged) {
  if (!image_files_supported()) GTEST_SKIP() << "built without libvips";
  Fixture fx;
  PrepareOptions o = fx.options();
  const TextEncoderHook text = stand_in_text();
  o.text = &text;
  const PrepareSummary first = prepare_dataset(o);
  EXPECT_EQ(first.encoded, 4);
  const std::string bytes = read_bytes(fx.out);
  const int64_t mtime = mtime_ns(fx.out);
  const PrepareSummary again = prepare_dataset(o);
  EXPECT_TRUE(again.up_to_date);
  EXPECT_EQ(again.encoded, 0);
  EXPECT_EQ(again.bad.size(), 5u) << "bad lines are still reported";
  EXPECT_EQ(read_bytes(fx.out), bytes);
  EXPECT_EQ(mtime_ns(fx.out), mtime) << "an unchanged input must not rewrite the dataset";

  Dataset old(fx.out);
  const Sample old2 = old.read(1), old4 = old.read(3);
  // Change one caption and one image: only those two samples are encoded again.
  std::string j = read_bytes(fx.jsonl);
  j.replace(j.find("a red cube"), 10, "a blue cube");
  write_lines(fx.jsonl, {j.substr(0, j.size() - 1)});
  save_png(fx.tmp.path("data/img/t4.png"), picture(64, 96, 99));
  const PrepareSummary third = prepare_dataset(o);
  EXPECT_FALSE(third.up_to_date);
  EXPECT_EQ(third.encoded, 2);
  EXPECT_EQ(third.reused, 2);
  Dataset now(fx.out);
  EXPECT_EQ(now.read(0).caption, "a blue cube");
  EXPECT_TRUE(at::equal(now.read(1).target, old2.target)) << "unchanged sample copied";
  EXPECT_TRUE(at::equal(now.read(1).t5, old2.t5));
  EXPECT_FALSE(at::equal(now.read(3).target, old4.target)) << "changed image re-encoded";
  // Embeddings are the hook's, and the dropout embedding is " "'s.
  EXPECT_TRUE(at::equal(now.read(0).t5.to(at::kFloat),
                        text.encode({"a blue cube"}).t5[0].to(at::kBFloat16).to(at::kFloat)));
  EXPECT_TRUE(now.info().has_dropout_embeddings);
}

// kill -9 in the middle: the output path never holds a partial dataset (the old one stays);
// SIGTERM: the temp file is removed too and the exit code says so.
TEST(Prepare, InterruptedRunLeavesNoPartialDataset) {
  if (!image_files_supported()) GTEST_SKIP() << "built without libvips";
  Fixture fx;
  std::vector<std::string> lines;
  for (int i = 0; i < 60; ++i) {
    const std::string name = "img/big" + std::to_string(i) + ".png";
    save_png(fx.tmp.path("data/" + name), picture(256, 256, 100 + static_cast<uint64_t>(i)));
    lines.push_back(R"({"source": "img/c1.png", "caption": "x", "target": ")" + name + "\"}");
  }
  write_lines(fx.jsonl, lines);
  std::ofstream(fx.out) << "old dataset";
  for (int sig : {SIGKILL, SIGTERM}) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      const int devnull = ::open("/dev/null", O_WRONLY);
      ::dup2(devnull, 1);
      ::dup2(devnull, 2);
      ::execl(FLUXTRAIN_BIN, FLUXTRAIN_BIN, "prepare", "--train_data_dir", fx.jsonl.c_str(), "--output", fx.out.c_str(),
              "--pretrained_model_name_or_path", fx.model.c_str(), "--spatial_column", "source", "--noise_size", "256",
              "--cond_size", "32", "--cache_latents", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    const std::string tmp = fx.out + ".tmp." + std::to_string(pid);
    bool seen = false;
    for (int i = 0; i < 60000 && !seen; ++i) {
      seen = path_exists(tmp);
      if (!seen) ::usleep(1000);
    }
    ASSERT_TRUE(seen) << "prepare never started writing";
    ::kill(pid, sig);
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_EQ(read_bytes(fx.out), "old dataset") << "signal " << sig;
    if (sig == SIGTERM) {
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 2) << status;
      EXPECT_FALSE(path_exists(tmp)) << "temp file left after SIGTERM";
    } else {
      remove_file(tmp);
    }
  }
}

// images -> prepare (cached latents, stand-in text embeddings) -> fluxtrain train -> LoRA.
TEST(Prepare, EndToEndImagesToTrainedLora) {
  if (!image_files_supported()) GTEST_SKIP() << "built without libvips";
  Fixture fx;
  save_bfl(path_join(fx.model, "flux1-dev.safetensors"), FluxConfig::preset("tiny"),
           init_random_weights(FluxConfig::preset("tiny"), 0, at::kFloat));
  PrepareOptions o = fx.options();
  const TextEncoderHook text = stand_in_text();
  o.text = &text;
  prepare_dataset(o);
  std::string log;
  const std::string cmd = std::string(FLUXTRAIN_BIN) + " train --pretrained_model_name_or_path " + fx.model +
                          " --train_data " + fx.out + " --output_dir " + fx.tmp.path("run") +
                          " --mixed_precision no --device cpu --ranks 4 --network_alphas 4 --cond_size 32"
                          " --noise_size 64 --max_train_steps 3 --validation_steps 0 --seed 1";
  ASSERT_EQ(run_command(cmd, &log), 0) << log;
  EXPECT_TRUE(path_exists(fx.tmp.path("run/lora.safetensors"))) << log;
}

// The trainer's online latents (train/online_latents.h) of a dataset that stores images equal the
// latents `prepare --cache_latents` caches for the same pictures, up to float32 rounding (the
// autoencoder batches differently: several images at once online, one at a time in prepare).
TEST(Prepare, PixelDatasetEncodedOnlineEqualsCachedLatents) {
  Fixture fx;
  PrepareOptions o = fx.options();
  prepare_dataset(o);
  o.cache_latents = false;
  o.output = fx.tmp.path("pixels.h5");
  prepare_dataset(o);
  const Dataset cached(fx.out), pixels(o.output);
  ASSERT_EQ(pixels.info().storage, "pixels");
  ASSERT_EQ(cached.size(), pixels.size());
  LoadedAutoencoder la = load_autoencoder(fx.model, "auto", at::kFloat);
  OnlineLatents online{Autoencoder(la.config, std::move(la.weights))};
  std::vector<Sample> batch;
  for (int64_t i = 0; i < pixels.size(); ++i) batch.push_back(pixels.read(i));
  online.fill(batch);
  double worst = 0;
  for (int64_t i = 0; i < cached.size(); ++i) {
    const Sample c = cached.read(i);
    const Sample& p = batch[static_cast<size_t>(i)];
    ASSERT_TRUE(p.target.defined());
    ASSERT_EQ(p.target.sizes(), c.target.sizes());
    worst = std::max(worst, rel_err(p.target, c.target));
    ASSERT_EQ(p.conds.size(), c.conds.size());
    for (size_t k = 0; k < c.conds.size(); ++k) worst = std::max(worst, rel_err(p.conds[k], c.conds[k]));
  }
  std::cout << "online vs cached latents: max relative difference " << worst << "\n";
  EXPECT_LT(worst, 1e-5);
}

// prepare --cache_text_embeddings with the snapshot's encoders (cli/prepare_text_encoders.h):
// every caption's T5 states and CLIP pooled vector, and the dropped caption's, as the encoders
// give them (float32 storage: exact).
TEST(Prepare, CachedTextEmbeddingsAreTheEncodersOutputs) {
  Fixture fx;
  const FluxConfig tiny = FluxConfig::preset("tiny");
  write_tiny_text_encoders(fx.model, tiny.vec_in_dim, tiny.context_in_dim, 3, at::kFloat);
  PrepareTextEncoders te = load_prepare_text_encoders(fx.model, 8, at::kFloat, at::kCPU);
  PrepareOptions o = fx.options();
  o.text = &te.hook;
  o.embed_dtype = at::kFloat;
  o.caption_dropout = 0.5;
  prepare_dataset(o);
  const Dataset ds(fx.out);
  ASSERT_TRUE(ds.info().has_text_embeddings);
  ASSERT_TRUE(ds.info().has_dropout_embeddings);
  EXPECT_EQ(ds.info().text_len, 8);
  EXPECT_EQ(ds.info().text_dim, tiny.context_in_dim);
  EXPECT_EQ(ds.info().pooled_dim, tiny.vec_in_dim);
  at::NoGradGuard ng;
  bool dropped = false;
  for (int64_t i = 0; i < ds.size(); ++i) {
    for (uint64_t epoch = 0; epoch < 4; ++epoch) {
      const Sample s = ds.read(i, 7, epoch);
      const TextEncoding e = te.encoders->encode({s.caption});
      EXPECT_TRUE(at::equal(s.t5, e.prompt_embeds[0])) << i;
      EXPECT_TRUE(at::equal(s.pooled, e.pooled_prompt_embeds[0])) << i;
      dropped = dropped || s.caption_dropped;
    }
  }
  EXPECT_TRUE(dropped);  // the dropped caption's embeddings were checked too
}

}  // namespace
}  // namespace fluxtrain
