#include "data/prepare.h"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <future>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <ATen/ATen.h>
#include <boost/crc.hpp>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/hdf5_io.h"
#include "data/augment.h"
#include "data/buckets.h"
#include "data/dataset.h"
#include "data/image_io.h"
#include "encoders/autoencoder_weights.h"
#include "core/progress.h"

namespace fluxtrain {
namespace {

// ---------------------------------------------------------------------------------------------
// Content hashes: CRC-64/XZ (Boost.CRC) over bytes; hex strings in the file.
using Crc64 = boost::crc_optimal<64, 0x42F0E1EBA9EA3693ULL, ~0ULL, ~0ULL, true, true>;

uint64_t crc64(const void* data, size_t n, uint64_t prefix = 0) {
  Crc64 c;
  c.process_bytes(&prefix, sizeof prefix);
  c.process_bytes(data, n);
  return c.checksum();
}
uint64_t crc64(const std::string& s, uint64_t prefix = 0) { return crc64(s.data(), s.size(), prefix); }

std::string hex(uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}

// Identity of the autoencoder's weights (whichever layout they came from).
std::string weights_identity(const TensorMap& w) {
  uint64_t h = 0;
  for (const auto& kv : w) {
    const at::Tensor t = kv.second.to(at::kCPU).contiguous();
    h = crc64(kv.first, h);
    h = crc64(t.data_ptr(), static_cast<size_t>(t.numel() * t.element_size()), h);
  }
  return hex(h);
}

// ---------------------------------------------------------------------------------------------
std::vector<std::string> split_columns(const std::string& s) {
  std::vector<std::string> out;
  if (s.empty() || s == "None") return out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    const size_t a = item.find_first_not_of(" \t"), b = item.find_last_not_of(" \t");
    if (a == std::string::npos) throw Error("column list '" + s + "' has an empty name");
    out.push_back(item.substr(a, b - a + 1));
  }
  return out;
}

std::string dir_of(const std::string& path) {
  const size_t s = path.find_last_of('/');
  return s == std::string::npos ? "." : (s == 0 ? "/" : path.substr(0, s));
}

// Relative paths are relative to the jsonl file's folder; EasyControl's own examples are relative
// to the working directory, so that is tried when the first does not exist.
std::string resolve(const std::string& base, const std::string& p) {
  if (!p.empty() && p[0] == '/') return p;
  const std::string a = path_join(base, p);
  if (path_exists(a) || !path_exists(p)) return a;
  return p;
}

int64_t file_size(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : 0;
}

// SIGINT/SIGTERM during prepare: stop at the next sample and remove the temp file (the writer's
// destructor), so an interrupted run leaves the old output, or none, never a partial one.
std::atomic<bool> g_interrupted{false};
extern "C" void on_signal(int) { g_interrupted = true; }
struct SignalGuard {
  struct sigaction old_int {}, old_term {};
  SignalGuard() {
    g_interrupted = false;
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
  }
  ~SignalGuard() {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
  }
};

struct Candidate {
  int64_t line = 0;
  std::string caption;
  std::string target;              // resolved path
  std::vector<std::string> conds;  // resolved, per condition column
  std::string key;                 // content hash (hex)
};

// Decoded and transformed images of one sample, ready to encode (or to store as pixels).
struct Pixels {
  at::Tensor target;                    // [H, W, 3] uint8, bucket size
  std::vector<at::Tensor> conds;        // per column: [V, c, c, 3] (subject variants) or [1, ...]
  std::string bucket;
  std::string error_path, error;        // set when decoding failed
};

class ProgressLine {
 public:
  ProgressLine(int64_t total, std::FILE* out, int tty) : total_(total), out_(out) {
    tty_ = tty < 0 ? ::isatty(fileno(out)) != 0 : tty != 0;
    t0_ = std::chrono::steady_clock::now();
  }
  void update(int64_t done) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    const double rate = s > 0 ? static_cast<double>(done) / s : 0;
    const double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : -1;
    char line[160];
    std::snprintf(line, sizeof line, "prepare %lld/%lld  %.2f images/s  ETA %s", (long long)done, (long long)total_,
                  rate, format_duration(eta).c_str());
    if (tty_) {
      const int width = 24;
      const double frac = total_ > 0 ? static_cast<double>(done) / static_cast<double>(total_) : 1.0;
      const int filled = static_cast<int>(frac * width);
      std::fprintf(out_, "\r\033[K[%s%s] %3d%% %s", std::string(filled, '#').c_str(),
                   std::string(width - filled, '.').c_str(), static_cast<int>(frac * 100), line);
      shown_ = true;
    } else if (done == total_ || done % 50 == 0) {
      std::fprintf(out_, "%s\n", line);
    }
    std::fflush(out_);
  }
  void message(const std::string& m) {
    if (tty_ && shown_) std::fprintf(out_, "\r\033[K");
    std::fprintf(out_, "%s\n", m.c_str());
    shown_ = false;
    std::fflush(out_);
  }
  void finish() {
    if (tty_ && shown_) std::fprintf(out_, "\n");
    shown_ = false;
    std::fflush(out_);
  }

 private:
  int64_t total_;
  std::FILE* out_;
  bool tty_ = false, shown_ = false;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
PrepareSummary prepare_dataset(const PrepareOptions& opt) {
  const auto t_start = std::chrono::steady_clock::now();
  PrepareSummary sum;
  // Options.
  check_input(opt.on_bad_sample == "skip" || opt.on_bad_sample == "fail",
              "--on_bad_sample must be skip or fail, got '" + opt.on_bad_sample + "'");
  check_input(opt.noise_size >= 16 && opt.noise_size % 16 == 0, "--noise_size must be a positive multiple of 16");
  check_input(opt.cond_size >= 16 && opt.cond_size % 16 == 0, "--cond_size must be a positive multiple of 16");
  check_input(opt.augment_variants >= 1, "--augment_variants must be >= 1");
  check_input(opt.caption_dropout >= 0 && opt.caption_dropout <= 1, "--caption_dropout must be in [0, 1]");
  check_input(!opt.output.empty(), "--output is required");
  check_input(!opt.jsonl.empty(), "--train_data_dir (the jsonl file) is required");
  if (!path_exists(opt.jsonl)) throw Error(opt.jsonl + ": no such file (--train_data_dir)");
  if (is_directory(opt.jsonl)) throw Error(opt.jsonl + ": is a directory, expected a jsonl file (--train_data_dir)");
  const std::vector<std::string> subject_cols = split_columns(opt.subject_column);
  const std::vector<std::string> spatial_cols = split_columns(opt.spatial_column);
  std::vector<std::string> cond_cols = subject_cols, kinds(subject_cols.size(), "subject");
  cond_cols.insert(cond_cols.end(), spatial_cols.begin(), spatial_cols.end());
  kinds.insert(kinds.end(), spatial_cols.size(), "spatial");
  const int64_t K = static_cast<int64_t>(cond_cols.size());
  if (opt.lora_num >= 0 && K != opt.lora_num)
    throw Error("--subject_column/--spatial_column give " + std::to_string(K) + " condition column(s), but --lora_num is " +
                std::to_string(opt.lora_num));
  const std::vector<Bucket> buckets = make_buckets(opt.noise_size, opt.bucket_max_aspect);
  const bool fail_mode = opt.on_bad_sample == "fail";
  const std::string storage = opt.cache_latents ? "latents" : "pixels";
  const int64_t variants = opt.cache_latents ? opt.augment_variants : 1;
  ProgressLine progress(0, opt.log, opt.tty);

  // The autoencoder (only to cache latents).
  Autoencoder ae;
  std::string vae_id = "none";
  if (opt.cache_latents) {
    check_input(!opt.model.empty(), "--cache_latents needs --pretrained_model_name_or_path (the VAE)");
    LoadedAutoencoder la;
    try {
      la = load_autoencoder(opt.model, opt.vae_layout, at::kFloat);
    } catch (...) {
      rethrow_with_context("--pretrained_model_name_or_path");
    }
    vae_id = weights_identity(la.weights);
    ae = Autoencoder(la.config, std::move(la.weights));
    ae.to(at::TensorOptions().device(c10::Device(opt.device)).dtype(opt.vae_dtype));
  }
  std::string settings;
  {
    std::ostringstream ss;
    ss << "fluxtrain-prepare-1 storage=" << storage << " noise=" << opt.noise_size << " cond=" << opt.cond_size
       << " aspect=" << opt.bucket_max_aspect << " variants=" << variants << " seed=" << opt.seed
       << " latent_dtype=" << c10::toString(opt.latent_dtype) << " vae_dtype=" << c10::toString(opt.vae_dtype)
       << " tile=" << opt.tile.tile_px << "/" << opt.tile.overlap_px << " vae=" << vae_id
       << " text=" << (opt.text ? opt.text->identity : std::string("none"))
       << (opt.text ? " embed_dtype=" + std::string(c10::toString(opt.embed_dtype)) : std::string()) << " kinds=";
    for (const auto& k : kinds) ss << k << ",";
    settings = ss.str();
  }

  // Phase 1: every line parsed and checked; image headers read (fail mode: images decoded, so
  // that every bad line is reported before anything is written).
  std::vector<Candidate> cands;
  std::map<std::string, std::string> file_hash;  // path -> content hash
  {
    const std::string base = dir_of(opt.jsonl);
    std::stringstream in(read_text_file(opt.jsonl));
    std::string text;
    int64_t line_no = 0;
    while (std::getline(in, text)) {
      ++line_no;
      if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
      ++sum.lines;
      auto bad = [&](const std::string& path, const std::string& reason) { sum.bad.push_back({line_no, path, reason}); };
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(text);
      } catch (const std::exception& e) {
        std::string m = e.what();
        bad(opt.jsonl, "bad JSON (" + m.substr(m.find(']') == std::string::npos ? 0 : m.find(']') + 2) + ")");
        continue;
      }
      if (!j.is_object()) {
        bad(opt.jsonl, "not a JSON object");
        continue;
      }
      Candidate c;
      c.line = line_no;
      std::string problem, problem_path = opt.jsonl;
      auto image_path = [&](const std::string& col, std::string* out) -> bool {
        if (!j.contains(col)) {
          problem = "missing key '" + col + "'";
          return false;
        }
        const auto& v = j[col];
        if (v.is_array()) {
          problem = "has " + std::to_string(v.size()) + " images in '" + col + "', expected 1 (" +
                    std::to_string(K) + " condition column(s), --lora_num " +
                    (opt.lora_num >= 0 ? std::to_string(opt.lora_num) : std::to_string(K)) + ")";
          return false;
        }
        if (!v.is_string() || v.get<std::string>().empty()) {
          problem = "'" + col + "' must be an image path (a non-empty string)";
          return false;
        }
        *out = resolve(base, v.get<std::string>());
        return true;
      };
      bool ok = image_path(opt.target_column, &c.target);
      for (const auto& col : cond_cols) {
        if (!ok) break;
        c.conds.emplace_back();
        ok = image_path(col, &c.conds.back());
      }
      if (ok) {
        if (!j.contains(opt.caption_column)) {
          ok = false;
          problem = "missing key '" + opt.caption_column + "'";
        } else if (!j[opt.caption_column].is_string()) {
          ok = false;
          problem = "caption '" + opt.caption_column + "' is not a string";
        } else {
          c.caption = j[opt.caption_column].get<std::string>();
          if (c.caption.find_first_not_of(" \t\r\n") == std::string::npos) {
            ok = false;
            problem = "empty caption";
          }
        }
      }
      // Files: present and decodable; content hashed (once per file).
      std::vector<std::string> files{c.target};
      files.insert(files.end(), c.conds.begin(), c.conds.end());
      for (size_t f = 0; ok && f < files.size(); ++f) {
        const std::string& p = files[f];
        if (file_hash.count(p)) continue;
        try {
          if (!path_exists(p)) throw Error(p + ": no such file");
          if (fail_mode) load_image_rgb8(p);
          else probe_image(p);
          file_hash[p] = hex(crc64(read_text_file(p)));
        } catch (const Error& e) {
          ok = false;
          problem_path = p;
          std::string m = e.what();
          problem = m.rfind(p + ": ", 0) == 0 ? m.substr(p.size() + 2) : m;
        }
      }
      if (!ok) {
        bad(problem_path, problem);
        continue;
      }
      std::string k = settings + "\n" + c.caption;
      for (const auto& p : files) k += "\n" + file_hash[p];
      c.key = hex(crc64(k));
      cands.push_back(std::move(c));
    }
  }
  auto report_bad = [&](ProgressLine& pl) {
    for (const auto& b : sum.bad)
      pl.message(opt.jsonl + ":" + std::to_string(b.line) + ": " + (b.path == opt.jsonl ? "" : b.path + ": ") + b.reason);
  };
  if (fail_mode && !sum.bad.empty()) {
    report_bad(progress);
    throw Error(opt.jsonl + ": " + std::to_string(sum.bad.size()) + " bad line(s) (first: line " +
                std::to_string(sum.bad[0].line) + ": " + sum.bad[0].reason + "); --on_bad_sample fail: nothing written");
  }
  if (cands.empty()) {
    report_bad(progress);
    throw Error(opt.jsonl + ": no usable line (" + std::to_string(sum.lines) + " line(s), " +
                std::to_string(sum.bad.size()) + " bad)");
  }
  // The whole output's key: settings, per-sample keys in order, dataset-level options.
  std::string prepare_key;
  {
    std::string k = settings + " dropout=" + std::to_string(opt.caption_dropout) + " bucketed=1\n";
    for (const auto& c : cands) k += c.key + "\n";
    prepare_key = hex(crc64(k));
  }

  // Unchanged input: nothing to do (the file is not even opened for writing).
  std::map<std::string, int64_t> old_rows;  // sample key -> row of the old output
  std::unique_ptr<Dataset> old;
  if (path_exists(opt.output)) {
    try {
      h5::File f = h5::File::open(opt.output);
      if (f.has_attr("prepare_key") && f.attr_string("prepare_key") == prepare_key) {
        // Same input as last time: report what was written then.
        sum.up_to_date = true;
        sum.written = f.attr_int("num_samples");
        sum.reused = sum.written;
        sum.bytes = file_size(opt.output);
        sum.bad.clear();
        if (f.has("prepare") && f.group("prepare").has("bad_lines")) {
          for (const auto& s : f.group("prepare").read_strings("bad_lines")) {
            std::stringstream ss(s);
            BadSample b;
            std::string line;
            std::getline(ss, line, '\t');
            std::getline(ss, b.path, '\t');
            std::getline(ss, b.reason);
            b.line = std::stoll(line);
            sum.bad.push_back(b);
          }
        }
        h5::Location t = f.group("target");
        const at::Tensor shape = t.read_tensor("shape");
        auto sh = shape.accessor<int64_t, 2>();
        const int64_t mult = f.has_attr("storage") && f.attr_string("storage") == "pixels" ? 1 : 8;
        for (int64_t i = 0; i < shape.size(0); ++i)
          ++sum.buckets[std::to_string(sh[i][2] * mult) + "x" + std::to_string(sh[i][1] * mult)];
        sum.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
        return sum;
      }
      if (f.has_attr("prepare_settings") && f.attr_string("prepare_settings") == settings) {
        const auto keys = f.group("prepare").read_strings("sample_key");
        for (size_t i = 0; i < keys.size(); ++i) old_rows.emplace(keys[i], static_cast<int64_t>(i));
      }
    } catch (const Error&) {
      old_rows.clear();  // not ours or unreadable: it will be replaced as a whole
    }
    if (!old_rows.empty()) old = std::make_unique<Dataset>(opt.output);
  }

  // Phase 2: decode, transform, encode, write (temp file; renamed at the end).
  SignalGuard signals;
  DatasetSpec spec;
  spec.version2 = true;
  spec.latent_channels = opt.cache_latents ? ae.config().latent_channels : 16;
  spec.cond_kinds = kinds;
  spec.latent_dtype = opt.latent_dtype;
  spec.embed_dtype = opt.embed_dtype;
  spec.storage = storage;
  spec.text_embeddings = opt.text != nullptr;
  spec.cond_variants.assign(static_cast<size_t>(K), 1);
  for (int64_t k = 0; k < K; ++k)
    if (kinds[static_cast<size_t>(k)] == "subject") spec.cond_variants[static_cast<size_t>(k)] = variants;
  spec.caption_dropout = opt.caption_dropout;
  spec.bucketed = true;
  if (opt.text) {
    spec.text_len = opt.text->text_len;
    spec.text_dim = opt.text->text_dim;
    spec.pooled_dim = opt.text->pooled_dim;
    const TextEmbeddings e = opt.text->encode({" "});
    spec.dropout_t5 = e.t5[0];
    spec.dropout_pooled = e.pooled[0];
  }
  DatasetWriter writer(opt.output, spec);
  std::vector<std::string> keys_written;
  std::vector<int64_t> lines_written;

  // Decoding and resizing run ahead on worker threads; the autoencoder runs on this thread.
  auto decode = [&](const Candidate& c) {
    Pixels px;
    std::string current;
    try {
      current = c.target;
      const at::Tensor t = load_image_rgb8(c.target);
      const Bucket& b = buckets[choose_bucket(buckets, t.size(1), t.size(0))];
      px.target = fit_to_bucket(t, b);
      px.bucket = std::to_string(b.width) + "x" + std::to_string(b.height);
      for (int64_t k = 0; k < K; ++k) {
        current = c.conds[static_cast<size_t>(k)];
        const at::Tensor img = load_image_rgb8(current);
        if (kinds[static_cast<size_t>(k)] == "spatial") {
          px.conds.push_back(spatial_condition(img, opt.cond_size).unsqueeze(0));
        } else if (!opt.cache_latents) {
          px.conds.push_back(subject_resize(img, opt.cond_size).unsqueeze(0));  // augmented when read
        } else {
          // Variant v: the draws of "epoch" v for this sample's content key.
          const uint64_t id = std::stoull(c.key, nullptr, 16);
          std::vector<at::Tensor> vs;
          const at::Tensor resized = subject_resize(img, opt.cond_size);
          for (int64_t v = 0; v < variants; ++v) {
            const SampleDraws d = draw_sample(opt.seed, static_cast<uint64_t>(v), id, 0.0, {1});
            vs.push_back(subject_finish(resized, opt.cond_size, &d.subject[0]));
          }
          px.conds.push_back(at::stack(vs));
        }
      }
    } catch (const Error& e) {
      px.error_path = current;
      std::string m = e.what();
      px.error = m.rfind(current + ": ", 0) == 0 ? m.substr(current.size() + 2) : m;
    }
    return px;
  };
  auto encode_images = [&](const at::Tensor& nhwc) {  // [N, H, W, 3] uint8 -> [N, C, h, w]
    const at::Tensor x = nhwc.permute({0, 3, 1, 2}).to(at::kFloat).div(127.5).sub(1.0);
    return ae.encode(x, opt.tile).to(at::kCPU).to(at::kFloat);
  };

  ProgressLine bar(static_cast<int64_t>(cands.size()), opt.log, opt.tty);
  const size_t ahead = std::max<size_t>(2, std::thread::hardware_concurrency());
  std::map<size_t, std::future<Pixels>> pending;
  size_t next_launch = 0;
  auto launch = [&]() {
    while (next_launch < cands.size() && pending.size() < ahead) {
      const size_t i = next_launch++;
      if (old_rows.count(cands[i].key)) continue;  // reused: nothing to decode
      pending.emplace(i, std::async(std::launch::async, decode, std::cref(cands[i])));
    }
  };
  for (size_t i = 0; i < cands.size(); ++i) {
    if (g_interrupted) throw Error("interrupted: nothing written (" + opt.output + " unchanged)");
    launch();
    const Candidate& c = cands[i];
    Sample s;
    s.caption = c.caption;
    s.target_path = c.target;
    s.cond_paths = c.conds;
    auto old_it = old_rows.find(c.key);
    if (old_it != old_rows.end()) {
      // Unchanged sample: latents (or pixels) and embeddings copied from the old output.
      const int64_t r = old_it->second;
      const Sample o = old->read(r);
      s.target = o.target;
      s.target_pixels = o.target_pixels;
      for (int64_t k = 0; k < K; ++k) {
        const at::Tensor all = old->read_condition_variants(r, k);
        if (opt.cache_latents) s.conds.push_back(variants > 1 && kinds[static_cast<size_t>(k)] == "subject" ? all : all[0]);
        else s.cond_pixels.push_back(all[0]);
      }
      s.t5 = o.t5;
      s.pooled = o.pooled;
      const int64_t mult = opt.cache_latents ? 8 : 1;
      const at::Tensor& t = opt.cache_latents ? s.target : s.target_pixels;
      ++sum.buckets[std::to_string(t.size(2) * mult) + "x" + std::to_string(t.size(1) * mult)];
      ++sum.reused;
    } else {
      Pixels px = pending.at(i).get();
      pending.erase(i);
      if (!px.error.empty()) {
        sum.bad.push_back({c.line, px.error_path, px.error});
        if (fail_mode) {
          report_bad(bar);
          throw Error(px.error_path + ": " + px.error + " (line " + std::to_string(c.line) +
                      "); --on_bad_sample fail: nothing written");
        }
        bar.update(static_cast<int64_t>(i + 1));
        continue;
      }
      if (opt.cache_latents) {
        s.target = encode_images(px.target.unsqueeze(0))[0];
        for (int64_t k = 0; k < K; ++k) {
          const at::Tensor lat = encode_images(px.conds[static_cast<size_t>(k)]);
          s.conds.push_back(spec.cond_variants[static_cast<size_t>(k)] > 1 ? lat : lat[0]);
        }
      } else {
        s.target_pixels = px.target.permute({2, 0, 1}).contiguous();
        for (const auto& cp : px.conds) s.cond_pixels.push_back(cp[0].permute({2, 0, 1}).contiguous());
      }
      if (opt.text) {
        const TextEmbeddings e = opt.text->encode({c.caption});
        s.t5 = e.t5[0];
        s.pooled = e.pooled[0];
      }
      ++sum.buckets[px.bucket];
      ++sum.encoded;
    }
    writer.add(s);
    keys_written.push_back(c.key);
    lines_written.push_back(c.line);
    bar.update(static_cast<int64_t>(i + 1));
  }
  bar.finish();
  if (writer.size() == 0) throw Error(opt.jsonl + ": no sample could be decoded; nothing written");
  if (g_interrupted) throw Error("interrupted: nothing written (" + opt.output + " unchanged)");

  // Prepare's own records: sample hashes (incremental re-runs), jsonl lines, bad lines.
  {
    h5::File& f = writer.file();
    h5::Location g = f.create_group("prepare");
    g.write_strings("sample_key", keys_written);
    std::vector<std::string> bad_lines;
    for (const auto& b : sum.bad) bad_lines.push_back(std::to_string(b.line) + "\t" + b.path + "\t" + b.reason);
    if (!bad_lines.empty()) g.write_strings("bad_lines", bad_lines);
    g.write_tensor("line", at::tensor(lines_written, at::TensorOptions().dtype(at::kLong)));
    f.set_attr("prepare_key", prepare_key);
    f.set_attr("prepare_settings", settings);
    f.set_attr("noise_size", opt.noise_size);
    f.set_attr("cond_size", opt.cond_size);
    f.set_attr("augment_variants", variants);
    f.set_attr("source_jsonl", opt.jsonl);
  }
  old.reset();  // the old output may be replaced now
  writer.finish();
  sum.written = static_cast<int64_t>(keys_written.size());
  sum.bytes = file_size(opt.output);
  sum.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  return sum;
}

std::string format_summary(const PrepareSummary& s, const std::string& output) {
  std::ostringstream o;
  if (s.up_to_date) o << output << ": up to date (inputs unchanged), nothing written\n";
  o << "samples: " << s.written << " written (" << s.encoded << " encoded, " << s.reused << " unchanged), "
    << s.bad.size() << " skipped, of " << s.lines << " lines\n";
  for (const auto& b : s.bad) o << "  skipped line " << b.line << ": " << b.path << ": " << b.reason << "\n";
  o << "buckets:";
  for (const auto& kv : s.buckets) o << " " << kv.first << " (" << kv.second << ")";
  char buf[128];
  std::snprintf(buf, sizeof buf, "\nbytes on disk: %lld (%.1f KiB per sample), %.1f s\n", (long long)s.bytes,
                s.written ? static_cast<double>(s.bytes) / 1024.0 / static_cast<double>(s.written) : 0.0, s.seconds);
  o << buf;
  return o.str();
}

std::string summary_json(const PrepareSummary& s, const PrepareOptions& opt) {
  nlohmann::json j = {{"name", "prepare"},
                      {"config", {{"noise_size", opt.noise_size}, {"cond_size", opt.cond_size},
                                  {"cache_latents", opt.cache_latents}, {"augment_variants", opt.augment_variants},
                                  {"device", opt.device}, {"vae_dtype", c10::toString(opt.vae_dtype)}}},
                      {"up_to_date", s.up_to_date},
                      {"samples", s.written},
                      {"encoded", s.encoded},
                      {"skipped", s.bad.size()},
                      {"seconds", s.seconds},
                      {"images_per_s", s.seconds > 0 ? static_cast<double>(s.encoded) / s.seconds : 0.0},
                      {"bytes", s.bytes},
                      {"bytes_per_sample", s.written ? s.bytes / s.written : 0},
                      {"buckets", s.buckets}};
  return j.dump();
}

}  // namespace fluxtrain
