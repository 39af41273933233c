#include "train/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <mutex>
#include <random>
#include <regex>
#include <sstream>

#include <ATen/ATen.h>
#include <boost/crc.hpp>

#include "core/error.h"
#include "core/shape_str.h"
#include "core/fs.h"
#include "core/hdf5_io.h"
#include "core/limits.h"

namespace fluxtrain {
namespace {

constexpr const char* kFormat = "fluxtrain-checkpoint";
// Version 2: the verified header below. Version 1 files (no header, no checksum) still load.
constexpr int64_t kVersion = 2;

// The header: kHeaderBytes at the start of the file, before the HDF5 image (which HDF5 tools
// find at offset 512, as after a user block). Text, so that `head -c 512 checkpoint-40.h5`
// shows it; padded with zeros:
//   fluxtrain-checkpoint\nrun <id>\nstep <n>\nbytes <file size>\ncrc32 <8 hex digits>\n
// The CRC-32 covers the whole file with the crc32 digits replaced by '0'.
constexpr size_t kHeaderBytes = 512;
constexpr const char* kHeaderMagic = "fluxtrain-checkpoint\n";
constexpr const char* kCrcKey = "\ncrc32 ";

struct Header {
  std::string run_id;
  int64_t step = -1;
  uint64_t bytes = 0;
  uint32_t crc = 0;
};

uint32_t crc32_of(const char* p, size_t n) {
  boost::crc_32_type crc;
  crc.process_bytes(p, n);
  return crc.checksum();
}

// The CRC of an image whose header's crc32 field holds zeros (the form it is computed on).
uint32_t image_crc(std::string& image, size_t crc_at) {
  const std::string saved = image.substr(crc_at, 8);
  image.replace(crc_at, 8, "00000000");
  const uint32_t c = crc32_of(image.data(), image.size());
  image.replace(crc_at, 8, saved);
  return c;
}

// Parses the header at the start of `bytes`; false when there is none (a version 1 file).
// Throws Error for a header that is there but malformed. *crc_at: offset of the crc digits.
bool parse_header(const std::string& path, const std::string& bytes, Header* h, size_t* crc_at) {
  const size_t magic = std::strlen(kHeaderMagic);
  if (bytes.compare(0, magic, kHeaderMagic) != 0) return false;
  if (bytes.size() < kHeaderBytes) throw Error(path + ": truncated checkpoint (" + std::to_string(bytes.size()) + " bytes)");
  const std::string text = bytes.substr(0, std::min(kHeaderBytes, bytes.find('\0')));
  const size_t c = text.find(kCrcKey);
  if (c == std::string::npos || c + std::strlen(kCrcKey) + 8 > text.size())
    throw Error(path + ": damaged checkpoint header (no crc32)");
  *crc_at = c + std::strlen(kCrcKey);
  std::istringstream in(text.substr(magic));
  std::string key, value;
  bool have_bytes = false, have_crc = false;
  while (in >> key >> value) {
    if (key == "run") h->run_id = value;
    else if (key == "step") h->step = limits::parse_int(path + ": header step", value, 0, limits::kMaxSteps);
    else if (key == "bytes") h->bytes = static_cast<uint64_t>(limits::parse_int(path + ": header bytes", value, kHeaderBytes, INT64_MAX)), have_bytes = true;
    else if (key == "crc32") {
      char* end = nullptr;
      h->crc = static_cast<uint32_t>(std::strtoul(value.c_str(), &end, 16));
      have_crc = value.size() == 8 && end && *end == '\0';
    }
  }
  if (!have_bytes || !have_crc) throw Error(path + ": damaged checkpoint header");
  return true;
}

std::string read_file_bytes(const std::string& path) {
  if (!path_exists(path)) throw Error(path + ": no such file");
  if (is_directory(path)) throw Error(path + ": is a directory, expected a checkpoint file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open (" + std::strerror(errno) + ")");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Error(path + ": read failed (" + std::strerror(errno) + ")");
  return ss.str();
}

// Verifies size and CRC of a checkpoint image with a header; "" or the reason.
std::string check_image(const std::string& path, std::string& bytes, Header* h, bool* has_header) {
  size_t crc_at = 0;
  *has_header = parse_header(path, bytes, h, &crc_at);
  if (!*has_header) return "";
  if (bytes.size() != h->bytes)
    return "truncated or extended checkpoint: " + std::to_string(bytes.size()) + " bytes, its header says " +
           std::to_string(h->bytes);
  const uint32_t crc = image_crc(bytes, crc_at);
  if (crc != h->crc) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "checksum mismatch (stored %08" PRIx32 ", computed %08" PRIx32 ")", h->crc, crc);
    return std::string(buf) + ": the file is damaged";
  }
  return "";
}

// The run id of the checkpoints this process writes (set by save_checkpoint; used by pruning).
std::mutex g_run_mu;
std::string g_saving_run_id;

std::string describe(const FluxConfig& c) {
  std::ostringstream ss;
  ss << "hidden " << c.hidden_size << ", " << c.num_heads << " heads, " << c.depth << "+" << c.depth_single
     << " blocks, in_channels " << c.in_channels << ", context " << c.context_in_dim << ", pooled " << c.vec_in_dim
     << ", guidance " << (c.guidance_embed ? "yes" : "no");
  return ss.str();
}

}  // namespace

nlohmann::json flux_config_json(const FluxConfig& c) { return c.to_diffusers_json(); }

std::string checkpoint_path(const std::string& output_dir, int64_t step) {
  return path_join(output_dir, "checkpoint-" + std::to_string(step) + ".h5");
}

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& output_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  // Final names only: "checkpoint-500.h5.tmp.1234" (an interrupted write) never matches.
  static const std::regex re(R"(^checkpoint-(\d+)\.h5$)");
  for (const auto& name : list_directory(output_dir)) {  // POSIX helpers: see core/fs.h
    std::smatch m;
    const std::string path = path_join(output_dir, name);
    struct stat st;
    if (std::regex_match(name, m, re) && ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode))
      out.emplace_back(std::stoll(m[1]), path);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string latest_checkpoint(const std::string& output_dir, std::vector<std::string>* skipped) {
  auto all = list_checkpoints(output_dir);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    std::string why;
    try {
      load_checkpoint(it->second);  // everything a resume would check of the file itself
      return it->second;
    } catch (const Error& e) {
      why = e.what();
      if (why.rfind(it->second + ": ", 0) == 0) why = why.substr(it->second.size() + 2);
    }
    const std::string line = "skipping " + it->second + ": " + why +
                             (std::next(it) != all.rend() ? "; trying the previous checkpoint" : "");
    if (skipped) skipped->push_back(line);
    else std::cerr << "warning: " << line << std::endl;
  }
  return "";
}

std::string verify_checkpoint(const std::string& path) {
  try {
    load_checkpoint(path);
    return "";
  } catch (const Error& e) {
    return e.what();
  }
}

std::string checkpoint_run_id(const std::string& path) {
  // The header only (its first 512 bytes): no HDF5, no full read.
  std::ifstream in(path, std::ios::binary);
  std::string head(kHeaderBytes, '\0');
  if (!in.read(head.data(), head.size())) return "";
  Header h;
  size_t crc_at = 0;
  try {
    if (!parse_header(path, head, &h, &crc_at)) return "";
  } catch (const Error&) {
    return "";
  }
  return h.run_id;
}

std::vector<std::string> remove_stale_temp_files(const std::string& dir) {
  // The temp names of every file fluxtrain writes into an output folder (core/fs.h):
  // "<name>.tmp.<pid>".
  static const std::regex re(R"(^(checkpoint-\d+\.h5|lora\.safetensors|lora_masters\.safetensors|config\.json|metrics\.jsonl)\.tmp\.(\d+)$)");
  std::vector<std::string> removed;
  for (const auto& name : list_directory(dir)) {
    std::smatch m;
    if (!std::regex_match(name, m, re)) continue;
    const std::string digits = m[2];
    if (digits.size() > 9) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(digits));
    // A live process (this one, or another run writing here right now) keeps its file.
    if (pid == ::getpid() || (pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM))) continue;
    const std::string p = path_join(dir, name);
    if (remove_file(p)) removed.push_back(p);
  }
  return removed;
}

void check_resume_step(const std::string& path, int64_t step, int64_t max_steps) {
  if (step < max_steps) return;
  throw Error("--resume_from_checkpoint " + path + ": the checkpoint is at step " + std::to_string(step) +
              (step == max_steps ? ", which is already the last update of this run"
                                 : ", past the last update of this run (" + std::to_string(max_steps) + ")") +
              " (nothing to train: raise --max_train_steps or --num_train_epochs)");
}

std::string TrainState::new_run_id() {
  std::random_device rd;
  const uint64_t t = static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
  const uint64_t v = ((static_cast<uint64_t>(rd()) << 32) ^ rd() ^ t * 0x9e3779b97f4a7c15ull) ^ static_cast<uint64_t>(::getpid());
  char buf[20];
  std::snprintf(buf, sizeof buf, "%016" PRIx64, v);
  return buf;
}

void save_checkpoint(const std::string& path, const Checkpoint& ck) {
  // Built in memory (HDF5's core driver): a full disk or an I/O error can only happen in the
  // plain write below, which reports the system's reason and leaves no half-closed HDF5 file
  // behind (one made HDF5's library shutdown crash after a failed flush).
  std::string image;
  {
    h5::File f = h5::File::create_in_memory(path);
    f.set_attr("format", std::string(kFormat));
    f.set_attr("version", kVersion);
    f.set_attr("step", ck.state.step);
    f.set_attr("micro_batch", ck.state.micro_batch);
    f.set_attr("nonfinite_in_a_row", ck.state.nonfinite_in_a_row);
    f.set_attr("nonfinite_total", ck.state.nonfinite_total);
    f.set_attr("optimizer_steps", ck.state.optimizer_steps);
    f.set_attr("seed", static_cast<int64_t>(ck.state.seed));
    f.set_attr("lr", ck.state.lr);
    f.set_attr("global_batch", ck.state.global_batch);
    // Fixed-length strings: readers refuse variable-length ones (see h5::Location::read_strings).
    f.write_strings("config_json", {ck.config.dump()}, true);
    f.write_strings("model_json", {flux_config_json(ck.model).dump()}, true);
    f.write_strings("scheduler_json", {ck.scheduler.dump()}, true);
    // Weights and moments are small (LoRA only) and already random-looking: no compression.
    h5::WriteOptions raw;
    raw.deflate = 0;
    {
      h5::Location g = f.create_group("lora");
      for (const auto& kv : ck.lora) g.write_tensor(kv.first, kv.second, raw);
    }
    {
      h5::Location g = f.create_group("optimizer");
      for (const auto& kv : ck.optimizer) g.write_tensor(kv.first, kv.second, raw);
    }
    image = std::string(kHeaderBytes, '\0') + f.image();
  }
  std::string header = std::string(kHeaderMagic) + "run " + ck.state.run_id + "\nstep " + std::to_string(ck.state.step) +
                       "\nbytes " + std::to_string(image.size()) + kCrcKey + "00000000\n";
  if (header.size() > kHeaderBytes || ck.state.run_id.find_first_of(" \n\t") != std::string::npos)
    throw Error(path + ": checkpoint header too long (run id?)", ErrorKind::Internal);
  image.replace(0, header.size(), header);
  const size_t crc_at = header.find(kCrcKey) + std::strlen(kCrcKey);
  char hex[9];
  std::snprintf(hex, sizeof hex, "%08" PRIx32, image_crc(image, crc_at));
  image.replace(crc_at, 8, hex);
  {
    std::lock_guard<std::mutex> lock(g_run_mu);
    g_saving_run_id = ck.state.run_id;
  }

  AtomicFile out(path);  // "<path>.tmp.<pid>"; removed again unless committed
  out.write(image.data(), image.size());
  if (const char* abort_at = std::getenv("FLUXTRAIN_TEST_ABORT_BEFORE_RENAME")) {
    if (std::to_string(ck.state.step) == abort_at) {
      std::fflush(nullptr);
      std::_Exit(134);  // like a kill: the temp file stays, nothing is renamed or cleaned up
    }
  }
  out.commit();  // fflush + fsync + rename; a full disk is "<path>: flush failed (No space left on device)"
}

Checkpoint load_checkpoint(const std::string& path) {
  Checkpoint ck;
  std::string bytes = read_file_bytes(path);
  Header header;
  bool has_header = false;
  const std::string damage = check_image(path, bytes, &header, &has_header);
  if (!damage.empty()) throw Error(path + ": " + damage);
  // Verified before HDF5 parses a byte: damaged files never reach the library.
  h5::File f = h5::File::open_image(path, has_header ? bytes.substr(kHeaderBytes) : bytes);
  bytes.clear();
  bytes.shrink_to_fit();
  try {
    if (!f.has_attr("format") || f.attr_string("format") != kFormat)
      throw Error(path + ": not a fluxtrain checkpoint (see docs/checkpoint.md)");
    const int64_t version = f.attr_int("version");
    if (version != kVersion && version != 1)
      throw Error(path + ": checkpoint version " + std::to_string(version) + " is not supported");
    if (version >= 2 && !has_header) throw Error(path + ": checkpoint without its verified header (damaged?)");
    // Every number is range-checked before use: a damaged or hand-edited file must not steer
    // the data stream or the optimizer somewhere absurd.
    auto count = [&](const char* name, int64_t lo, int64_t hi) {
      const int64_t v = f.attr_int(name);
      limits::check_range(path + ": " + name, v, lo, hi, " (damaged checkpoint?)");
      return v;
    };
    using limits::kMaxSteps;
    ck.state.step = count("step", 0, kMaxSteps);
    ck.state.micro_batch = count("micro_batch", ck.state.step, kMaxSteps);  // >= 1 micro-batch per update
    ck.state.nonfinite_total = count("nonfinite_total", 0, ck.state.micro_batch);
    ck.state.nonfinite_in_a_row = count("nonfinite_in_a_row", 0, ck.state.nonfinite_total);
    ck.state.optimizer_steps = count("optimizer_steps", 0, ck.state.micro_batch);
    ck.state.seed = static_cast<uint64_t>(count("seed", 0, INT64_MAX));
    ck.state.lr = f.attr_double("lr");
    limits::check_range(path + ": lr", ck.state.lr, 0.0, 1e6, " (damaged checkpoint?)");
    // Absent in checkpoints written before distributed training: 0 = unknown (one rank).
    ck.state.global_batch = f.has_attr("global_batch") ? count("global_batch", 0, limits::kMaxBatch * limits::kMaxRanks) : 0;
    if (has_header && header.step != ck.state.step)
      throw Error(path + ": header says step " + std::to_string(header.step) + ", the file step " +
                  std::to_string(ck.state.step) + " (damaged checkpoint?)");
    ck.state.run_id = header.run_id;  // "" for version 1: such files are never pruned
    auto one = [&](const std::string& name) {
      auto v = f.read_strings(name, /*allow_variable=*/version == 1);
      if (v.size() != 1) throw Error(path + ": /" + name + " must hold one string");
      try {
        return nlohmann::json::parse(v[0]);
      } catch (const std::exception&) {
        throw Error(path + ": /" + name + " is not valid JSON");
      }
    };
    ck.config = one("config_json");
    ck.scheduler = one("scheduler_json");
    ck.model = FluxConfig::from_diffusers_json(one("model_json"), path);
    // LoRA masters and moments: floating point and finite (training never stores anything else).
    auto tensors = [&](const char* group, TensorMap& into) {
      h5::Location g = f.group(group);
      for (const auto& name : g.children()) {
        at::Tensor t = g.read_tensor(name);
        const std::string what = std::string("/") + group + "/" + limits::printable(name, 120);
        if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble)
          throw Error(path + ": " + what + " is " + c10::toString(t.scalar_type()) + ", expected float32 or float64");
        if (!at::isfinite(t).all().item<bool>())
          throw Error(path + ": " + what + " holds non-finite values (damaged checkpoint?)");
        into.emplace(name, std::move(t));
      }
    };
    tensors("lora", ck.lora);
    tensors("optimizer", ck.optimizer);
  } catch (const Error& e) {
    const std::string m = e.what();
    if (m.rfind(path, 0) == 0) throw;
    throw Error(path + ": " + m);
  }
  return ck;
}

std::vector<std::string> prune_checkpoints(const std::string& output_dir, int64_t limit) {
  std::vector<std::string> removed;
  if (limit <= 0) return removed;
  std::string mine;
  {
    std::lock_guard<std::mutex> lock(g_run_mu);
    mine = g_saving_run_id;
  }
  if (mine.empty()) return removed;
  std::vector<std::pair<int64_t, std::string>> all;
  for (auto& c : list_checkpoints(output_dir))
    if (checkpoint_run_id(c.second) == mine) all.push_back(std::move(c));  // never another run's
  while (static_cast<int64_t>(all.size()) > limit) {
    remove_file(all.front().second);
    removed.push_back(all.front().second);
    all.erase(all.begin());
  }
  return removed;
}

void check_checkpoint_matches(const Checkpoint& ck, const std::string& path, const FluxConfig& model,
                              const LoraSet& lora) {
  if (!(ck.model == model))
    throw Error(path + ": checkpoint is for another model size (" + describe(ck.model) + "); this model has " +
                describe(model));
  const TensorMap mine = lora.state();
  for (const auto& kv : mine) {
    auto it = ck.lora.find(kv.first);
    if (it == ck.lora.end())
      throw Error(path + ": checkpoint has no LoRA weight " + kv.first + " (different --lora_mode, --lora_num or targets?)");
    if (it->second.sizes() != kv.second.sizes())
      throw Error(path + ": LoRA weight " + kv.first + " is " + shape_str(it->second.sizes()) + " in the checkpoint, " +
                  shape_str(kv.second.sizes()) + " in this run (different --ranks?)");
  }
  for (const auto& kv : ck.lora)
    if (!mine.count(kv.first))
      throw Error(path + ": checkpoint has LoRA weight " + kv.first + " that this run does not (different --lora_mode, "
                  "--lora_num or targets?)");
}

}  // namespace fluxtrain
