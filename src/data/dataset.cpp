#include "data/dataset.h"

#include <algorithm>
#include <cstdio>
#include <map>

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/limits.h"
#include "core/rng.h"
#include "data/augment.h"
#include "model/flux_config.h"

namespace fluxtrain {
namespace {

constexpr const char* kFormat = "fluxtrain-dataset";
constexpr int64_t kVersion = 2;  // reads 1 and 2; writes 1 unless a version-2 feature is used

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
    if (version < 1 || version > kVersion)
      throw Error(p + "dataset version " + std::to_string(version) + ", this fluxtrain reads versions 1 to " +
                  std::to_string(kVersion));
    info_.version = version;
    const int64_t n = file_.attr_int("num_samples");
    if (n <= 0) throw Error(p + "dataset has no samples");
    limits::check_range(p + "num_samples", n, 1, limits::kMaxSamples, " (damaged file?)");
    info_.num_samples = n;
    info_.latent_channels = file_.attr_int("latent_channels");
    info_.text_len = file_.attr_int("text_len");
    info_.text_dim = file_.attr_int("text_dim");
    info_.pooled_dim = file_.attr_int("pooled_dim");
    limits::check_range(p + "latent_channels", info_.latent_channels, 1, 1024, " (damaged file?)");
    const int64_t k = file_.attr_int("num_conditions");
    if (k < 0) throw Error(p + "negative num_conditions");
    if (version >= 2) {
      info_.storage = file_.attr_string("storage");
      if (info_.storage != "latents" && info_.storage != "pixels")
        throw Error(p + "storage must be latents or pixels, got '" + info_.storage + "'");
      info_.bucketed = file_.attr_int("bucketed") != 0;
      info_.has_text_embeddings = file_.attr_int("text_embeddings") != 0;
      info_.caption_dropout = file_.attr_double("caption_dropout");
      info_.has_dropout_embeddings = info_.has_text_embeddings && file_.has("text_dropout");
    }
    if (info_.has_text_embeddings) {  // captions only (version 2): the sizes are unused, may be 0
      limits::check_range(p + "text_len", info_.text_len, 1, 65536, " (damaged file?)");
      limits::check_range(p + "text_dim", info_.text_dim, 1, 65536, " (damaged file?)");
      limits::check_range(p + "pooled_dim", info_.pooled_dim, 1, 65536, " (damaged file?)");
    }
    const bool pixels = info_.storage == "pixels";
    // Index of a latent column: shapes [R, 3] (C, h, w), offsets [R] into the flat data array;
    // R = N x variants (row of sample i, variant v: i * variants + v). Pixel storage: (3, H, W).
    auto load_column = [&](const std::string& group, Column& c, int64_t variants, int64_t* max_hw,
                           int64_t* max_area) {
      h5::Location g = file_.group(group);
      c.group = group;
      c.variants = variants;
      // Sizes before reading: a damaged header can claim any size (found by fuzzing).
      if (g.shape("shape") != std::vector<int64_t>{n * variants, 3})
        throw Error(p + "/" + group + "/shape must be int64 [" + std::to_string(n * variants) + ", 3]");
      if (g.shape("offset") != std::vector<int64_t>{n * variants})
        throw Error(p + "/" + group + "/offset must be int64 [" + std::to_string(n * variants) + "]");
      c.shape = g.read_tensor("shape");
      c.offset = g.read_tensor("offset");
      const int64_t rows = n * variants;
      const auto data_shape = g.shape("data");
      if (c.shape.dim() != 2 || c.shape.size(0) != rows || c.shape.size(1) != 3 || c.shape.scalar_type() != at::kLong)
        throw Error(p + "/" + group + "/shape must be int64 [" + std::to_string(rows) + ", 3]");
      if (c.offset.dim() != 1 || c.offset.size(0) != rows || c.offset.scalar_type() != at::kLong)
        throw Error(p + "/" + group + "/offset must be int64 [" + std::to_string(rows) + "]");
      if (data_shape.size() != 1) throw Error(p + "/" + group + "/data must be 1-d");
      const int64_t total = data_shape[0];
      auto sh = c.shape.accessor<int64_t, 2>();
      auto off = c.offset.accessor<int64_t, 1>();
      const int64_t want_c = pixels ? 3 : info_.latent_channels, mult = pixels ? 16 : 2;
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t C = sh[i][0], h = sh[i][1], w = sh[i][2];
        if (C != want_c || h <= 0 || w <= 0 || h % mult || w % mult)
          throw Error(p + "/" + group + ": sample " + std::to_string(i / variants) + " has " +
                      (pixels ? "image" : "latent") + " shape [" + std::to_string(C) + ", " + std::to_string(h) +
                      ", " + std::to_string(w) + "], expected [" + std::to_string(want_c) + ", h, w] with h, w multiples of " +
                      std::to_string(mult));
        const int64_t lh = pixels ? h / 8 : h, lw = pixels ? w / 8 : w;
        if (lh > limits::kMaxImageSize / 8 || lw > limits::kMaxImageSize / 8)
          throw Error(p + "/" + group + ": sample " + std::to_string(i / variants) + " has latents of " +
                      std::to_string(lh) + " x " + std::to_string(lw) + ", more than " +
                      std::to_string(limits::kMaxImageSize / 8) + " per side");
        // Sides bounded above, so C * h * w cannot overflow; nor can the comparison (off >= 0).
        if (off[i] < 0 || off[i] > total - C * h * w)
          throw Error(p + "/" + group + ": sample " + std::to_string(i / variants) + " lies outside the data array (corrupt index)");
        *max_hw = std::max({*max_hw, lh, lw});
        if (max_area) *max_area = std::max(*max_area, lh * lw);
      }
    };
    load_column("target", target_, 1, &info_.max_target_hw, &info_.max_target_area);
    for (int64_t c = 0; c < k; ++c) {
      conds_.emplace_back();
      h5::Location g = file_.group(cond_group(c));
      const int64_t variants = g.has_attr("variants") ? g.attr_int("variants") : 1;
      if (variants < 1) throw Error(p + "/" + cond_group(c) + ": variants must be >= 1");
      load_column(cond_group(c), conds_.back(), variants, &info_.max_cond_hw, nullptr);
      const std::string kind = g.attr_string("kind");
      if (kind != "subject" && kind != "spatial")
        throw Error(p + "/" + cond_group(c) + ": kind must be subject or spatial, got '" + kind + "'");
      info_.cond_kinds.push_back(kind);
      info_.cond_variants.push_back(variants);
    }
    if (info_.has_text_embeddings) {
      const auto t5 = file_.shape("t5");
      if (t5 != std::vector<int64_t>{n, info_.text_len, info_.text_dim})
        throw Error(p + "/t5 must be [" + std::to_string(n) + ", " + std::to_string(info_.text_len) + ", " +
                    std::to_string(info_.text_dim) + "]");
      const auto pooled = file_.shape("clip_pooled");
      if (pooled != std::vector<int64_t>{n, info_.pooled_dim})
        throw Error(p + "/clip_pooled must be [" + std::to_string(n) + ", " + std::to_string(info_.pooled_dim) + "]");
      for (const char* what : {"t5", "clip_pooled"}) {
        const at::ScalarType t = file_.read_rows(what, 0, 1).scalar_type();
        if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf)
          throw Error(p + "/" + what + " is " + dtype_name(t) + ", expected float32, bfloat16 or float16");
      }
      info_.embed_dtype = dtype_name(file_.read_rows("clip_pooled", 0, 1).scalar_type());
      if (info_.has_dropout_embeddings) {
        h5::Location g = file_.group("text_dropout");
        dropout_t5_ = g.read_tensor("t5");
        dropout_pooled_ = g.read_tensor("clip_pooled");
        if (dropout_t5_.sizes().vec() != std::vector<int64_t>{info_.text_len, info_.text_dim} ||
            dropout_pooled_.sizes().vec() != std::vector<int64_t>{info_.pooled_dim})
          throw Error(p + "/text_dropout: embeddings of the wrong shape");
      }
    }
    // Latents and embeddings are floating point (float32, bfloat16 or float16; docs/dataset.md);
    // pixel storage holds uint8 images.
    auto floating = [&](const std::string& what, const at::Tensor& first) {
      const at::ScalarType t = first.scalar_type();
      if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf)
        throw Error(p + "/" + what + " is " + dtype_name(t) + ", expected float32, bfloat16 or float16");
      return t;
    };
    const at::Tensor first_target = file_.group("target").read_rows("data", 0, 1);
    info_.latent_dtype = dtype_name(pixels ? first_target.scalar_type() : floating("target/data", first_target));
    if (!pixels)
      for (int64_t c = 0; c < k; ++c)
        floating(cond_group(c) + "/data", file_.group(cond_group(c)).read_rows("data", 0, 1));
    // The count is checked before reading: HDF5 reads variable-length strings one by one.
    if (file_.shape("caption") != std::vector<int64_t>{n}) throw Error(p + "/caption must have one string per sample");
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

at::Tensor Dataset::read_latent(const Column& c, int64_t row) const {
  auto sh = c.shape.accessor<int64_t, 2>();
  const int64_t C = sh[row][0], h = sh[row][1], w = sh[row][2];
  const int64_t off = c.offset.accessor<int64_t, 1>()[row];
  return file_.group(c.group).read_rows("data", off, C * h * w).view({C, h, w});
}

Sample Dataset::read(int64_t i) const { return read_impl(i, nullptr); }

Sample Dataset::read(int64_t i, uint64_t seed, uint64_t epoch) const {
  const SampleDraws d = draw_sample(seed, epoch, static_cast<uint64_t>(i), info_.caption_dropout, info_.cond_variants);
  return read_impl(i, &d);
}

Sample Dataset::read_impl(int64_t i, const SampleDraws* d) const {
  if (i < 0 || i >= info_.num_samples)
    throw Error(info_.path + ": sample " + std::to_string(i) + " out of range", ErrorKind::Internal);
  const bool pixels = info_.storage == "pixels";
  Sample s;
  s.index = i;
  (pixels ? s.target_pixels : s.target) = read_latent(target_, i);
  for (size_t k = 0; k < conds_.size(); ++k) {
    const Column& c = conds_[k];
    const int64_t v = d ? d->variant[k] : 0;
    at::Tensor x = read_latent(c, i * c.variants + v);
    if (pixels) {
      // Latents not cached: subject augmentation happens here, on the stored resized image.
      if (d && info_.cond_kinds[k] == "subject") {
        const at::Tensor hwc = x.permute({1, 2, 0});
        const int64_t side = std::max(hwc.size(0), hwc.size(1));
        x = subject_finish(hwc, side, &d->subject[k]).permute({2, 0, 1}).contiguous();
      }
      s.cond_pixels.push_back(x);
    } else {
      s.conds.push_back(x);
    }
  }
  s.caption = captions_[static_cast<size_t>(i)];
  if (info_.has_text_embeddings) {
    s.t5 = file_.read_rows("t5", i, 1)[0];
    s.pooled = file_.read_rows("clip_pooled", i, 1)[0];
  }
  if (d && d->drop_caption) {
    s.caption_dropped = true;
    s.caption = " ";  // EasyControl's dropped caption
    if (info_.has_dropout_embeddings) {
      s.t5 = dropout_t5_;
      s.pooled = dropout_pooled_;
    }
  }
  if (!target_paths_.empty()) s.target_path = target_paths_[static_cast<size_t>(i)];
  for (const auto& cp : cond_paths_) s.cond_paths.push_back(cp.empty() ? "" : cp[static_cast<size_t>(i)]);
  return s;
}

at::Tensor Dataset::read_condition_variants(int64_t i, int64_t k) const {
  check_input(i >= 0 && i < info_.num_samples && k >= 0 && k < info_.num_conditions(),
              info_.path + ": sample/condition out of range");
  const Column& c = conds_[static_cast<size_t>(k)];
  std::vector<at::Tensor> vs;
  for (int64_t v = 0; v < c.variants; ++v) vs.push_back(read_latent(c, i * c.variants + v));
  return at::stack(vs);
}

std::vector<int64_t> Dataset::target_shape_ids() const {
  std::map<std::pair<int64_t, int64_t>, int64_t> ids;
  std::vector<int64_t> out;
  auto sh = target_.shape.accessor<int64_t, 2>();
  for (int64_t i = 0; i < info_.num_samples; ++i) {
    auto key = std::make_pair(sh[i][1], sh[i][2]);
    auto it = ids.emplace(key, static_cast<int64_t>(ids.size())).first;
    out.push_back(it->second);
  }
  // Ids in sorted shape order (not first-appearance order), so they depend on the set of shapes only.
  std::map<std::pair<int64_t, int64_t>, int64_t> rank;
  int64_t r = 0;
  for (const auto& kv : ids) rank[kv.first] = r++;
  for (int64_t i = 0; i < info_.num_samples; ++i) out[static_cast<size_t>(i)] = rank[{sh[i][1], sh[i][2]}];
  return out;
}

void Dataset::check_compatible(const FluxConfig& m, int64_t expected_conditions, int64_t noise_size,
                               int64_t cond_size, bool text_online, bool vae_online) const {
  const std::string p = info_.path + ": ";
  if (!info_.has_text_embeddings && !text_online)
    throw Error(p + "has no cached text embeddings (prepared without a text encoder); this run does not encode "
                    "captions itself");
  if (info_.storage == "pixels" && !vae_online)
    throw Error(p + "holds images, not cached latents (prepare without --cache_latents); this run does not "
                    "encode images itself");
  if (info_.latent_channels * 4 != m.in_channels)
    throw Error(p + "latents have " + std::to_string(info_.latent_channels) + " channels, the model expects " +
                std::to_string(m.in_channels / 4) + " (in_channels " + std::to_string(m.in_channels) + " = 4 x C)");
  if (info_.has_text_embeddings && info_.text_dim != m.context_in_dim)
    throw Error(p + "T5 embeddings are " + std::to_string(info_.text_dim) + " wide, the model expects " +
                std::to_string(m.context_in_dim));
  if (info_.has_text_embeddings && info_.pooled_dim != m.vec_in_dim)
    throw Error(p + "CLIP pooled embeddings are " + std::to_string(info_.pooled_dim) + " wide, the model expects " +
                std::to_string(m.vec_in_dim));
  if (expected_conditions >= 0 && info_.num_conditions() != expected_conditions)
    throw Error(p + "has " + std::to_string(info_.num_conditions()) + " condition column(s), but --lora_num is " +
                std::to_string(expected_conditions));
  // Aspect buckets: the area is bounded (noise_size^2), not each side.
  if (info_.max_target_area * 64 > noise_size * noise_size)
    throw Error(p + "target latents up to " + std::to_string(info_.max_target_area) + " positions (" +
                std::to_string(info_.max_target_area * 64) + " pixels) exceed --noise_size " + std::to_string(noise_size) +
                " (area " + std::to_string(noise_size * noise_size) + ")");
  if (info_.max_cond_hw * 8 > cond_size)
    throw Error(p + "condition latents up to " + std::to_string(info_.max_cond_hw) + " (" +
                std::to_string(info_.max_cond_hw * 8) + " pixels) exceed --cond_size " + std::to_string(cond_size));
}

// ---------------------------------------------------------------------------------------------
DatasetWriter::DatasetWriter(const std::string& path, const DatasetSpec& spec)
    : path_(path), tmp_(temp_path_for(path)), spec_(spec) {
  for (const auto& k : spec.cond_kinds)
    if (k != "subject" && k != "spatial") throw Error("dataset writer: condition kind must be subject or spatial");
  check_input(spec.storage == "latents" || spec.storage == "pixels", "dataset writer: storage must be latents or pixels");
  spec_.cond_variants.resize(spec.cond_kinds.size(), 1);
  for (int64_t v : spec_.cond_variants) check_input(v >= 1, "dataset writer: variants must be >= 1");
  const bool pixels = spec.storage == "pixels";
  file_ = std::make_unique<h5::File>(h5::File::create(tmp_));
  const int64_t flat_chunk = 1 << 16;  // elements; a 64x64x16 latent is one chunk
  auto make_col = [&](const std::string& group) {
    Col c;
    c.group = group;
    h5::Location g = file_->create_group(group);
    c.data = h5::Appendable(g, "data", pixels ? at::kByte : spec.latent_dtype, {}, flat_chunk);
    return c;
  };
  cols_.push_back(make_col("target"));
  if (!spec.cond_kinds.empty()) file_->create_group("cond");
  for (size_t k = 0; k < spec.cond_kinds.size(); ++k) {
    cols_.push_back(make_col(cond_group(static_cast<int64_t>(k))));
    h5::Location g = file_->group(cond_group(static_cast<int64_t>(k)));
    g.set_attr("kind", spec.cond_kinds[k]);
    if (spec_.cond_variants[k] > 1) g.set_attr("variants", spec_.cond_variants[k]);
  }
  if (spec.text_embeddings) {
    t5_ = h5::Appendable(*file_, "t5", spec.embed_dtype, {spec.text_len, spec.text_dim}, 1);
    pooled_ = h5::Appendable(*file_, "clip_pooled", spec.embed_dtype, {spec.pooled_dim}, 256);
  }
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
  const bool pixels = spec_.storage == "pixels";
  check_input((pixels ? s.cond_pixels.size() : s.conds.size()) == spec_.cond_kinds.size(),
              w + "wrong number of conditions");
  if (spec_.text_embeddings) {
    check_input(s.t5.defined() && s.t5.dim() == 2 && s.t5.size(0) == spec_.text_len && s.t5.size(1) == spec_.text_dim,
                w + "T5 embedding must be [" + std::to_string(spec_.text_len) + ", " + std::to_string(spec_.text_dim) + "]");
    check_input(s.pooled.defined() && s.pooled.dim() == 1 && s.pooled.size(0) == spec_.pooled_dim,
                w + "CLIP pooled must be [" + std::to_string(spec_.pooled_dim) + "]");
  }
  for (size_t c = 0; c < cols_.size(); ++c) {
    const int64_t variants = c == 0 ? 1 : spec_.cond_variants[c - 1];
    at::Tensor lat = pixels ? (c == 0 ? s.target_pixels : s.cond_pixels[c - 1]) : (c == 0 ? s.target : s.conds[c - 1]);
    if (!pixels && variants > 1) {
      check_input(lat.dim() == 4 && lat.size(0) == variants, w + "condition " + std::to_string(c - 1) + " must hold " +
                                                                 std::to_string(variants) + " variants [V, C, h, w]");
    } else {
      lat = lat.unsqueeze(0);
    }
    for (int64_t v = 0; v < lat.size(0); ++v) {
      const at::Tensor x = lat[v];
      if (pixels)
        check_input(x.dim() == 3 && x.size(0) == 3 && x.scalar_type() == at::kByte && x.size(1) % 16 == 0 &&
                        x.size(2) % 16 == 0,
                    w + "images must be uint8 [3, H, W] with H, W multiples of 16");
      else
        check_input(x.dim() == 3 && x.size(0) == spec_.latent_channels && x.size(1) % 2 == 0 && x.size(2) % 2 == 0,
                    w + "latents must be [" + std::to_string(spec_.latent_channels) + ", even h, even w]");
      Col& col = cols_[c];
      col.shapes.insert(col.shapes.end(), {x.size(0), x.size(1), x.size(2)});
      col.offsets.push_back(col.total);
      col.data.append(x.reshape({-1}));
      col.total += x.numel();
    }
  }
  if (spec_.text_embeddings) {
    t5_.append(s.t5.unsqueeze(0));
    pooled_.append(s.pooled.unsqueeze(0));
  }
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
    const int64_t rows = static_cast<int64_t>(col.offsets.size());
    g.write_tensor("shape", i64(col.shapes, {rows, 3}));
    g.write_tensor("offset", i64(col.offsets, {rows}));
  }
  const bool v2 = spec_.version2 || spec_.storage != "latents" || !spec_.text_embeddings || spec_.bucketed ||
                  spec_.caption_dropout > 0 ||
                  std::any_of(spec_.cond_variants.begin(), spec_.cond_variants.end(), [](int64_t v) { return v > 1; });
  if (v2) {
    file_->set_attr("storage", spec_.storage);
    file_->set_attr("bucketed", static_cast<int64_t>(spec_.bucketed));
    file_->set_attr("text_embeddings", static_cast<int64_t>(spec_.text_embeddings));
    file_->set_attr("caption_dropout", spec_.caption_dropout);
    if (spec_.text_embeddings && spec_.dropout_t5.defined()) {
      h5::Location g = file_->create_group("text_dropout");
      g.write_tensor("t5", spec_.dropout_t5.to(spec_.embed_dtype).contiguous());
      g.write_tensor("clip_pooled", spec_.dropout_pooled.to(spec_.embed_dtype).contiguous());
    }
  }
  file_->write_strings("caption", captions_);
  h5::Location src = file_->create_group("source");
  src.write_strings("target", target_paths_);
  for (size_t c = 0; c < cond_paths_.size(); ++c) src.write_strings("cond_" + std::to_string(c), cond_paths_[c]);
  file_->set_attr("format", std::string(kFormat));
  file_->set_attr("version", v2 ? kVersion : int64_t{1});
  file_->set_attr("num_samples", n_);
  file_->set_attr("latent_channels", spec_.latent_channels);
  file_->set_attr("text_len", spec_.text_embeddings ? spec_.text_len : int64_t{0});
  file_->set_attr("text_dim", spec_.text_embeddings ? spec_.text_dim : int64_t{0});
  file_->set_attr("pooled_dim", spec_.text_embeddings ? spec_.pooled_dim : int64_t{0});
  file_->set_attr("num_conditions", static_cast<int64_t>(spec_.cond_kinds.size()));
  file_->set_attr("latent_dtype", spec_.storage == "pixels" ? std::string("uint8") : dtype_name(spec_.latent_dtype));
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

DataOrder::DataOrder(const std::vector<int64_t>& bucket, int64_t batch_size, int rank, int world_size, uint64_t seed)
    : n_(static_cast<int64_t>(bucket.size())), batch_(batch_size), rank_(rank), world_(world_size), seed_(seed) {
  check_input(world_size >= 1 && rank >= 0 && rank < world_size, "data order: bad rank/world size");
  check_input(batch_size >= 1, "data order: batch size must be >= 1");
  std::map<int64_t, std::vector<int64_t>> by_bucket;  // sorted by bucket id
  for (int64_t i = 0; i < n_; ++i) by_bucket[bucket[static_cast<size_t>(i)]].push_back(i);
  per_epoch_ = 0;
  for (auto& kv : by_bucket) {
    per_epoch_ += static_cast<int64_t>(kv.second.size()) / (batch_ * world_);
    buckets_.push_back(std::move(kv.second));
  }
  if (per_epoch_ == 0)
    throw Error("no aspect bucket of the dataset has a whole global batch of " + std::to_string(batch_ * world_) +
                " samples (--train_batch_size " + std::to_string(batch_) + " x " + std::to_string(world_) +
                " ranks; " + std::to_string(buckets_.size()) + " buckets, " + std::to_string(n_) + " samples)");
}

DataOrder DataOrder::for_dataset(const Dataset& ds, int64_t batch_size, int rank, int world_size, uint64_t seed) {
  if (ds.info().bucketed) return DataOrder(ds.target_shape_ids(), batch_size, rank, world_size, seed);
  return DataOrder(ds.size(), batch_size, rank, world_size, seed);
}

namespace {
// Fisher-Yates with our own generator: the order is fixed by the generator's seed alone.
void shuffle(std::vector<int64_t>& p, uint64_t seed) {
  ScalarRng rng(seed);
  const int64_t n = static_cast<int64_t>(p.size());
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.uniform() * static_cast<double>(i + 1));
    std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(std::min(j, i))]);
  }
}
}  // namespace

std::vector<int64_t> DataOrder::permutation(int64_t epoch) const {
  const uint64_t e = static_cast<uint64_t>(epoch);
  if (buckets_.empty()) {
    std::vector<int64_t> p(static_cast<size_t>(n_));
    for (int64_t i = 0; i < n_; ++i) p[static_cast<size_t>(i)] = i;
    shuffle(p, derive_seed(seed_, RngPurpose::Shuffle, e, 0));
    return p;
  }
  // Bucketed: shuffle within each bucket (index 1 + bucket), cut into global batches, shuffle
  // the batches (index 0).
  const int64_t G = batch_ * world_;
  std::vector<std::vector<int64_t>> batches;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    std::vector<int64_t> ids = buckets_[b];
    shuffle(ids, derive_seed(seed_, RngPurpose::Shuffle, e, 1 + b));
    for (size_t s = 0; s + static_cast<size_t>(G) <= ids.size(); s += static_cast<size_t>(G))
      batches.emplace_back(ids.begin() + static_cast<int64_t>(s), ids.begin() + static_cast<int64_t>(s) + G);
  }
  std::vector<int64_t> order(batches.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  shuffle(order, derive_seed(seed_, RngPurpose::Shuffle, e, 0));
  std::vector<int64_t> p;
  for (int64_t k : order) p.insert(p.end(), batches[static_cast<size_t>(k)].begin(), batches[static_cast<size_t>(k)].end());
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
Prefetcher::Prefetcher(const Dataset& ds, const DataOrder& order, int64_t start, int64_t depth, PrepareFn prepare)
    : ds_(ds), order_(order), next_read_(start), depth_(std::max<int64_t>(1, depth)), prepare_(std::move(prepare)) {
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
      for (int64_t i : order_.indices(m))
        b.samples.push_back(ds_.read(i, order_.seed(), static_cast<uint64_t>(b.epoch)));
      if (prepare_) prepare_(b);
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
