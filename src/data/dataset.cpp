#include "data/dataset.h"

#include <algorithm>
#include <cstdio>

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/limits.h"
#include "core/rng.h"
#include "model/flux_config.h"

namespace fluxtrain {
namespace {

constexpr const char* kFormat = "fluxtrain-dataset";
constexpr int64_t kVersion = 1;

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return c10::toString(t);
  }
}

std::string cond_group(int64_t k) { return "cond/" + std::to_string(k); }

}  // namespace

// ---------------------------------------------------------------------------------------------
Dataset::Dataset(const std::string& path) {
  info_.path = path;
  file_ = h5::File::open(path);
  const std::string p = path + ": ";
  try {
    if (!file_.has_attr("format") || file_.attr_string("format") != kFormat)
      throw Error(p + "not a fluxtrain dataset (root attribute format != \"" + kFormat + "\"; see docs/dataset.md)");
    const int64_t version = file_.attr_int("version");
    if (version != kVersion)
      throw Error(p + "dataset version " + std::to_string(version) + ", this fluxtrain reads version " +
                  std::to_string(kVersion));
    const int64_t n = file_.attr_int("num_samples");
    if (n <= 0) throw Error(p + "dataset has no samples");
    limits::check_range(p + "num_samples", n, 1, limits::kMaxSamples, " (damaged file?)");
    info_.num_samples = n;
    info_.latent_channels = file_.attr_int("latent_channels");
    info_.text_len = file_.attr_int("text_len");
    info_.text_dim = file_.attr_int("text_dim");
    info_.pooled_dim = file_.attr_int("pooled_dim");
    limits::check_range(p + "latent_channels", info_.latent_channels, 1, 1024, " (damaged file?)");
    limits::check_range(p + "text_len", info_.text_len, 1, 65536, " (damaged file?)");
    limits::check_range(p + "text_dim", info_.text_dim, 1, 65536, " (damaged file?)");
    limits::check_range(p + "pooled_dim", info_.pooled_dim, 1, 65536, " (damaged file?)");
    const int64_t k = file_.attr_int("num_conditions");
    if (k < 0) throw Error(p + "negative num_conditions");

    // Index of a latent column: shapes [N, 3] (C, h, w), offsets [N] into the flat data array.
    auto load_column = [&](const std::string& group, Column& c, int64_t* max_hw) {
      h5::Location g = file_.group(group);
      c.group = group;
      // Sizes before reading: a damaged header can claim any size (found by fuzzing).
      if (g.shape("shape") != std::vector<int64_t>{n, 3})
        throw Error(p + "/" + group + "/shape must be int64 [" + std::to_string(n) + ", 3]");
      if (g.shape("offset") != std::vector<int64_t>{n})
        throw Error(p + "/" + group + "/offset must be int64 [" + std::to_string(n) + "]");
      c.shape = g.read_tensor("shape");
      c.offset = g.read_tensor("offset");
      const auto data_shape = g.shape("data");
      if (c.shape.dim() != 2 || c.shape.size(0) != n || c.shape.size(1) != 3 || c.shape.scalar_type() != at::kLong)
        throw Error(p + "/" + group + "/shape must be int64 [" + std::to_string(n) + ", 3]");
      if (c.offset.dim() != 1 || c.offset.size(0) != n || c.offset.scalar_type() != at::kLong)
        throw Error(p + "/" + group + "/offset must be int64 [" + std::to_string(n) + "]");
      if (data_shape.size() != 1) throw Error(p + "/" + group + "/data must be 1-d");
      const int64_t total = data_shape[0];
      auto sh = c.shape.accessor<int64_t, 2>();
      auto off = c.offset.accessor<int64_t, 1>();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t C = sh[i][0], h = sh[i][1], w = sh[i][2];
        if (C != info_.latent_channels || h <= 0 || w <= 0 || h % 2 || w % 2)
          throw Error(p + "/" + group + ": sample " + std::to_string(i) + " has latent shape [" + std::to_string(C) +
                      ", " + std::to_string(h) + ", " + std::to_string(w) + "], expected [" +
                      std::to_string(info_.latent_channels) + ", even h, even w]");
        if (off[i] < 0 || off[i] + C * h * w > total)
          throw Error(p + "/" + group + ": sample " + std::to_string(i) + " lies outside the data array (corrupt index)");
        if (h > limits::kMaxImageSize / 8 || w > limits::kMaxImageSize / 8)
          throw Error(p + "/" + group + ": sample " + std::to_string(i) + " has latents of " + std::to_string(h) + " x " +
                      std::to_string(w) + ", more than " + std::to_string(limits::kMaxImageSize / 8) + " per side");
        *max_hw = std::max({*max_hw, h, w});
      }
    };
    load_column("target", target_, &info_.max_target_hw);
    for (int64_t c = 0; c < k; ++c) {
      conds_.emplace_back();
      load_column(cond_group(c), conds_.back(), &info_.max_cond_hw);
      const std::string kind = file_.group(cond_group(c)).attr_string("kind");
      if (kind != "subject" && kind != "spatial")
        throw Error(p + "/" + cond_group(c) + ": kind must be subject or spatial, got '" + kind + "'");
      info_.cond_kinds.push_back(kind);
    }
    const auto t5 = file_.shape("t5");
    if (t5 != std::vector<int64_t>{n, info_.text_len, info_.text_dim})
      throw Error(p + "/t5 must be [" + std::to_string(n) + ", " + std::to_string(info_.text_len) + ", " +
                  std::to_string(info_.text_dim) + "]");
    const auto pooled = file_.shape("clip_pooled");
    if (pooled != std::vector<int64_t>{n, info_.pooled_dim})
      throw Error(p + "/clip_pooled must be [" + std::to_string(n) + ", " + std::to_string(info_.pooled_dim) + "]");
    // Latents and embeddings are floating point (float32, bfloat16 or float16; docs/dataset.md).
    auto floating = [&](const std::string& what, const at::Tensor& first) {
      const at::ScalarType t = first.scalar_type();
      if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf)
        throw Error(p + "/" + what + " is " + dtype_name(t) + ", expected float32, bfloat16 or float16");
      return t;
    };
    floating("t5", file_.read_rows("t5", 0, 1));
    info_.embed_dtype = dtype_name(floating("clip_pooled", file_.read_rows("clip_pooled", 0, 1)));
    info_.latent_dtype = dtype_name(floating("target/data", file_.group("target").read_rows("data", 0, 1)));
    for (int64_t c = 0; c < k; ++c)
      floating(cond_group(c) + "/data", file_.group(cond_group(c)).read_rows("data", 0, 1));
    captions_ = file_.read_strings("caption");
    if (static_cast<int64_t>(captions_.size()) != n) throw Error(p + "/caption must have one string per sample");
    if (file_.has("source/target")) target_paths_ = file_.read_strings("source/target");
    for (int64_t c = 0; c < k; ++c)
      cond_paths_.push_back(file_.has("source/cond_" + std::to_string(c))
                                ? file_.read_strings("source/cond_" + std::to_string(c))
                                : std::vector<std::string>{});
  } catch (const Error& e) {
    // Messages from h5 helpers already name the file; ours start with it too.
    const std::string m = e.what();
    if (m.rfind(path, 0) == 0) throw;
    throw Error(p + m);
  }
}

at::Tensor Dataset::read_latent(const Column& c, int64_t i) const {
  auto sh = c.shape.accessor<int64_t, 2>();
  const int64_t C = sh[i][0], h = sh[i][1], w = sh[i][2];
  const int64_t off = c.offset.accessor<int64_t, 1>()[i];
  return file_.group(c.group).read_rows("data", off, C * h * w).view({C, h, w});
}

Sample Dataset::read(int64_t i) const {
  if (i < 0 || i >= info_.num_samples)
    throw Error(info_.path + ": sample " + std::to_string(i) + " out of range", ErrorKind::Internal);
  Sample s;
  s.index = i;
  s.target = read_latent(target_, i);
  for (const auto& c : conds_) s.conds.push_back(read_latent(c, i));
  s.t5 = file_.read_rows("t5", i, 1)[0];
  s.pooled = file_.read_rows("clip_pooled", i, 1)[0];
  s.caption = captions_[static_cast<size_t>(i)];
  if (!target_paths_.empty()) s.target_path = target_paths_[static_cast<size_t>(i)];
  for (const auto& cp : cond_paths_) s.cond_paths.push_back(cp.empty() ? "" : cp[static_cast<size_t>(i)]);
  return s;
}

void Dataset::check_compatible(const FluxConfig& m, int64_t expected_conditions, int64_t noise_size,
                               int64_t cond_size) const {
  const std::string p = info_.path + ": ";
  if (info_.latent_channels * 4 != m.in_channels)
    throw Error(p + "latents have " + std::to_string(info_.latent_channels) + " channels, the model expects " +
                std::to_string(m.in_channels / 4) + " (in_channels " + std::to_string(m.in_channels) + " = 4 x C)");
  if (info_.text_dim != m.context_in_dim)
    throw Error(p + "T5 embeddings are " + std::to_string(info_.text_dim) + " wide, the model expects " +
                std::to_string(m.context_in_dim));
  if (info_.pooled_dim != m.vec_in_dim)
    throw Error(p + "CLIP pooled embeddings are " + std::to_string(info_.pooled_dim) + " wide, the model expects " +
                std::to_string(m.vec_in_dim));
  if (expected_conditions >= 0 && info_.num_conditions() != expected_conditions)
    throw Error(p + "has " + std::to_string(info_.num_conditions()) + " condition column(s), but --lora_num is " +
                std::to_string(expected_conditions));
  if (info_.max_target_hw * 8 > noise_size)
    throw Error(p + "target latents up to " + std::to_string(info_.max_target_hw) + " (" +
                std::to_string(info_.max_target_hw * 8) + " pixels) exceed --noise_size " + std::to_string(noise_size));
  if (info_.max_cond_hw * 8 > cond_size)
    throw Error(p + "condition latents up to " + std::to_string(info_.max_cond_hw) + " (" +
                std::to_string(info_.max_cond_hw * 8) + " pixels) exceed --cond_size " + std::to_string(cond_size));
}

// ---------------------------------------------------------------------------------------------
DatasetWriter::DatasetWriter(const std::string& path, const DatasetSpec& spec)
    : path_(path), tmp_(temp_path_for(path)), spec_(spec) {
  for (const auto& k : spec.cond_kinds)
    if (k != "subject" && k != "spatial") throw Error("dataset writer: condition kind must be subject or spatial");
  file_ = std::make_unique<h5::File>(h5::File::create(tmp_));
  const int64_t flat_chunk = 1 << 16;  // elements; a 64x64x16 latent is one chunk
  auto make_col = [&](const std::string& group) {
    Col c;
    c.group = group;
    h5::Location g = file_->create_group(group);
    c.data = h5::Appendable(g, "data", spec.latent_dtype, {}, flat_chunk);
    return c;
  };
  cols_.push_back(make_col("target"));
  if (!spec.cond_kinds.empty()) file_->create_group("cond");
  for (size_t k = 0; k < spec.cond_kinds.size(); ++k) {
    cols_.push_back(make_col(cond_group(static_cast<int64_t>(k))));
    file_->group(cond_group(static_cast<int64_t>(k))).set_attr("kind", spec.cond_kinds[k]);
  }
  t5_ = h5::Appendable(*file_, "t5", spec.embed_dtype, {spec.text_len, spec.text_dim}, 1);
  pooled_ = h5::Appendable(*file_, "clip_pooled", spec.embed_dtype, {spec.pooled_dim}, 256);
  cond_paths_.resize(spec.cond_kinds.size());
}

DatasetWriter::~DatasetWriter() {
  if (done_) return;
  cols_.clear();
  t5_ = h5::Appendable();
  pooled_ = h5::Appendable();
  file_.reset();
  std::remove(tmp_.c_str());
}

void DatasetWriter::add(const Sample& s) {
  const std::string w = path_ + ": sample " + std::to_string(n_) + ": ";
  check_input(s.conds.size() == spec_.cond_kinds.size(), w + "wrong number of conditions");
  check_input(s.t5.dim() == 2 && s.t5.size(0) == spec_.text_len && s.t5.size(1) == spec_.text_dim,
              w + "T5 embedding must be [" + std::to_string(spec_.text_len) + ", " + std::to_string(spec_.text_dim) + "]");
  check_input(s.pooled.dim() == 1 && s.pooled.size(0) == spec_.pooled_dim,
              w + "CLIP pooled must be [" + std::to_string(spec_.pooled_dim) + "]");
  for (size_t c = 0; c < cols_.size(); ++c) {
    const at::Tensor& lat = c == 0 ? s.target : s.conds[c - 1];
    check_input(lat.dim() == 3 && lat.size(0) == spec_.latent_channels && lat.size(1) % 2 == 0 && lat.size(2) % 2 == 0,
                w + "latents must be [" + std::to_string(spec_.latent_channels) + ", even h, even w]");
    Col& col = cols_[c];
    col.shapes.insert(col.shapes.end(), {lat.size(0), lat.size(1), lat.size(2)});
    col.offsets.push_back(col.total);
    col.data.append(lat.reshape({-1}));
    col.total += lat.numel();
  }
  t5_.append(s.t5.unsqueeze(0));
  pooled_.append(s.pooled.unsqueeze(0));
  captions_.push_back(s.caption);
  target_paths_.push_back(s.target_path);
  for (size_t c = 0; c < cond_paths_.size(); ++c)
    cond_paths_[c].push_back(c < s.cond_paths.size() ? s.cond_paths[c] : "");
  ++n_;
}

void DatasetWriter::finish() {
  check_input(!done_, path_ + ": dataset already finished");
  auto i64 = [](const std::vector<int64_t>& v, std::vector<int64_t> shape) {
    return at::tensor(v, at::TensorOptions().dtype(at::kLong)).reshape(shape);
  };
  for (auto& col : cols_) {
    h5::Location g = file_->group(col.group);
    g.write_tensor("shape", i64(col.shapes, {n_, 3}));
    g.write_tensor("offset", i64(col.offsets, {n_}));
  }
  file_->write_strings("caption", captions_);
  h5::Location src = file_->create_group("source");
  src.write_strings("target", target_paths_);
  for (size_t c = 0; c < cond_paths_.size(); ++c) src.write_strings("cond_" + std::to_string(c), cond_paths_[c]);
  file_->set_attr("format", std::string(kFormat));
  file_->set_attr("version", kVersion);
  file_->set_attr("num_samples", n_);
  file_->set_attr("latent_channels", spec_.latent_channels);
  file_->set_attr("text_len", spec_.text_len);
  file_->set_attr("text_dim", spec_.text_dim);
  file_->set_attr("pooled_dim", spec_.pooled_dim);
  file_->set_attr("num_conditions", static_cast<int64_t>(spec_.cond_kinds.size()));
  file_->set_attr("latent_dtype", dtype_name(spec_.latent_dtype));
  file_->set_attr("embed_dtype", dtype_name(spec_.embed_dtype));
  // Close every handle before the rename so that the file on disk is complete.
  {
    std::lock_guard<std::recursive_mutex> g(h5::lock());
    src.close();
    cols_.clear();
    t5_ = h5::Appendable();
    pooled_ = h5::Appendable();
    file_->flush();
    file_.reset();
  }
  commit_temp(tmp_, path_);
  done_ = true;
}

// ---------------------------------------------------------------------------------------------
DataOrder::DataOrder(int64_t num_samples, int64_t batch_size, int rank, int world_size, uint64_t seed)
    : n_(num_samples), batch_(batch_size), rank_(rank), world_(world_size), seed_(seed) {
  check_input(world_size >= 1 && rank >= 0 && rank < world_size, "data order: bad rank/world size");
  per_epoch_ = n_ / (batch_ * world_);
  if (per_epoch_ == 0)
    throw Error("the dataset has " + std::to_string(n_) + " samples, fewer than one global batch of " +
                std::to_string(batch_ * world_) + " (--train_batch_size " + std::to_string(batch_) + " x " +
                std::to_string(world_) + " ranks)");
}

std::vector<int64_t> DataOrder::permutation(int64_t epoch) const {
  // Fisher-Yates with our own generator: the order is fixed by (seed, epoch) alone.
  std::vector<int64_t> p(static_cast<size_t>(n_));
  for (int64_t i = 0; i < n_; ++i) p[static_cast<size_t>(i)] = i;
  ScalarRng rng(derive_seed(seed_, RngPurpose::Shuffle, static_cast<uint64_t>(epoch), 0));
  for (int64_t i = n_ - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.uniform() * static_cast<double>(i + 1));
    std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(std::min(j, i))]);
  }
  return p;
}

std::vector<int64_t> DataOrder::indices(int64_t m) const {
  const int64_t epoch = epoch_of(m);
  if (epoch != cached_epoch_) {
    cached_ = permutation(epoch);
    cached_epoch_ = epoch;
  }
  const int64_t base = (m % per_epoch_) * batch_ * world_ + rank_ * batch_;
  return std::vector<int64_t>(cached_.begin() + base, cached_.begin() + base + batch_);
}

// ---------------------------------------------------------------------------------------------
Prefetcher::Prefetcher(const Dataset& ds, const DataOrder& order, int64_t start, int64_t depth)
    : ds_(ds), order_(order), next_read_(start), depth_(std::max<int64_t>(1, depth)) {
  thread_ = std::thread([this] { run(); });
}

Prefetcher::~Prefetcher() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Prefetcher::run() {
  while (true) {
    int64_t m;
    {
      std::unique_lock<std::mutex> g(mu_);
      cv_.wait(g, [&] { return stop_ || static_cast<int64_t>(ready_.size()) < depth_; });
      if (stop_) return;
      m = next_read_++;
    }
    Batch b;
    try {
      b.micro_batch = m;
      b.epoch = order_.epoch_of(m);
      for (int64_t i : order_.indices(m)) b.samples.push_back(ds_.read(i));
    } catch (...) {
      std::lock_guard<std::mutex> g(mu_);
      error_ = std::current_exception();
      cv_.notify_all();
      return;
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      ready_.push_back(std::move(b));
    }
    cv_.notify_all();
  }
}

Batch Prefetcher::next() {
  std::unique_lock<std::mutex> g(mu_);
  cv_.wait(g, [&] { return !ready_.empty() || error_; });
  if (ready_.empty()) std::rethrow_exception(error_);
  Batch b = std::move(ready_.front());
  ready_.pop_front();
  cv_.notify_all();
  return b;
}

}  // namespace fluxtrain
