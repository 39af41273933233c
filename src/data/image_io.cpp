#include "data/image_io.h"

#include <cstring>
#include <mutex>

#include <ATen/ATen.h>
#if FLUXTRAIN_WITH_VIPS
#include <vips/vips.h>
#endif

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"

namespace fluxtrain {
#if FLUXTRAIN_WITH_VIPS
bool image_files_supported() { return true; }

namespace {

void init_vips() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (VIPS_INIT("fluxtrain")) throw Error("libvips failed to start: " + std::string(vips_error_buffer()));
    // One decoded image at a time per thread; no operation cache needed (every file is read once).
    vips_cache_set_max(0);
    // libvips' warnings ("not enough data", "error in tile") go to stderr through GLib; the error
    // that follows them is reported as one line instead.
    g_log_set_handler("VIPS", static_cast<GLogLevelFlags>(G_LOG_LEVEL_WARNING | G_LOG_LEVEL_MESSAGE | G_LOG_LEVEL_INFO),
                      [](const gchar*, GLogLevelFlags, const gchar*, gpointer) {}, nullptr);
  });
}

// First line of libvips' error buffer (then cleared), for one-line messages.
std::string vips_reason() {
  std::string m = vips_error_buffer();
  vips_error_clear();
  while (!m.empty() && (m.back() == '\n' || m.back() == ' ')) m.pop_back();
  const size_t nl = m.find('\n');
  if (nl != std::string::npos) m = m.substr(0, nl);
  return m.empty() ? "unknown libvips error" : m;
}

// Owns one VipsImage reference.
struct Img {
  VipsImage* p = nullptr;
  Img() = default;
  explicit Img(VipsImage* x) : p(x) {}
  ~Img() {
    if (p) g_object_unref(p);
  }
  Img(const Img&) = delete;
  Img& operator=(const Img&) = delete;
  void reset(VipsImage* x) {
    if (p) g_object_unref(p);
    p = x;
  }
};

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw Error(path + ": cannot decode image (" + what + ")");
}

// Applies one libvips operation (out-parameter style) and replaces img with its result.
template <typename F>
void step(Img& img, const std::string& path, const char* what, F op) {
  VipsImage* out = nullptr;
  if (op(img.p, &out)) fail(path, std::string(what) + ": " + vips_reason());
  img.reset(out);
}

void open_image(Img& img, const std::string& path) {
  init_vips();
  if (!path_exists(path)) throw Error(path + ": no such file");
  if (is_directory(path)) throw Error(path + ": is a directory, expected an image file");
  // fail_on truncated: a cut-off file is an error instead of an image with a grey bottom.
  VipsImage* p = vips_image_new_from_file(path.c_str(), "fail_on", VIPS_FAIL_ON_TRUNCATED, nullptr);
  std::string first_reason;
  if (!p) {
    // Loaders without the fail_on option (rare formats) are opened with their defaults.
    first_reason = vips_reason();
    p = vips_image_new_from_file(path.c_str(), nullptr);
  }
  if (!p) {
    std::string why = vips_reason();
    if (why == "unknown libvips error" || why.empty()) why = first_reason;
    // A file no loader recognises leaves libvips' buffer empty.
    if (why == "unknown libvips error" || why.empty()) why = "not an image format libvips reads";
    fail(path, why);
  }
  img.reset(p);
  // A decompression bomb (a few bytes claiming gigapixels) is refused from its header, as
  // Pillow's DecompressionBombError does (the same bound: 2 x 89,478,485 pixels).
  constexpr int64_t kMaxPixels = 178'956'970;
  const int64_t w = vips_image_get_width(p), h = vips_image_get_height(p);
  if (w <= 0 || h <= 0 || w * h > kMaxPixels)
    fail(path, std::to_string(w) + "x" + std::to_string(h) + " pixels, more than the " + std::to_string(kMaxPixels) +
                   " an image may have");
}

int orientation_of(VipsImage* p) {
  int o = 1;
  if (vips_image_get_typeof(p, VIPS_META_ORIENTATION) && vips_image_get_int(p, VIPS_META_ORIENTATION, &o) == 0)
    return o;
  vips_error_clear();
  return 1;
}

}  // namespace

ImageSize probe_image_file(const std::string& path) {
  Img img;
  open_image(img, path);
  const int o = orientation_of(img.p);
  ImageSize s{vips_image_get_width(img.p), vips_image_get_height(img.p)};
  if (o >= 5 && o <= 8) std::swap(s.width, s.height);
  return s;
}

at::Tensor load_image_file(const std::string& path) {
  Img img;
  open_image(img, path);
  // EXIF orientation (the tag is removed so nothing rotates twice).
  step(img, path, "orientation", [](VipsImage* in, VipsImage** out) { return vips_autorot(in, out, nullptr); });
  // Embedded ICC profile -> sRGB (Pillow ignores profiles; for untagged files both agree). A
  // broken profile falls back to the colourspace conversion below.
  if (vips_image_get_typeof(img.p, VIPS_META_ICC_NAME)) {
    VipsImage* out = nullptr;
    if (vips_icc_transform(img.p, &out, "srgb", "embedded", TRUE, "depth", 8, nullptr) == 0) img.reset(out);
    else vips_error_clear();
  }
  // Any interpretation (grey, 16-bit, CMYK, palette already expanded by the loader) -> 8-bit sRGB,
  // alpha kept as an extra band.
  step(img, path, "to sRGB", [](VipsImage* in, VipsImage** out) {
    return vips_colourspace(in, out, VIPS_INTERPRETATION_sRGB, nullptr);
  });
  if (vips_image_get_format(img.p) != VIPS_FORMAT_UCHAR)
    step(img, path, "to 8 bits", [](VipsImage* in, VipsImage** out) { return vips_cast_uchar(in, out, nullptr); });
  if (vips_image_hasalpha(img.p)) {
    step(img, path, "flatten alpha", [](VipsImage* in, VipsImage** out) {
      VipsArrayDouble* white = vips_array_double_newv(3, 255.0, 255.0, 255.0);
      const int r = vips_flatten(in, out, "background", white, "max_alpha", 255.0, nullptr);
      vips_area_unref(VIPS_AREA(white));
      return r;
    });
    if (vips_image_get_format(img.p) != VIPS_FORMAT_UCHAR)
      step(img, path, "to 8 bits", [](VipsImage* in, VipsImage** out) {
        VipsImage* r = nullptr;
        if (vips_round(in, &r, VIPS_OPERATION_ROUND_RINT, nullptr)) return -1;
        const int rc = vips_cast_uchar(r, out, nullptr);
        g_object_unref(r);
        return rc;
      });
  }
  if (vips_image_get_bands(img.p) != 3)
    step(img, path, "to 3 bands", [](VipsImage* in, VipsImage** out) {
      return vips_extract_band(in, out, 0, "n", 3, nullptr);
    });
  const int64_t W = vips_image_get_width(img.p), H = vips_image_get_height(img.p);
  size_t size = 0;
  void* mem = vips_image_write_to_memory(img.p, &size);  // decodes here: truncation shows up now
  if (!mem) fail(path, vips_reason());
  if (size != static_cast<size_t>(W * H * 3)) {
    g_free(mem);
    fail(path, "unexpected decoded size");
  }
  at::Tensor t = at::empty({H, W, 3}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(t.data_ptr(), mem, size);
  g_free(mem);
  return t;
}

std::string encode_png(const at::Tensor& hwc_u8) {
  init_vips();
  check_input(hwc_u8.dim() == 3 && hwc_u8.scalar_type() == at::kByte && (hwc_u8.size(2) == 3 || hwc_u8.size(2) == 1),
              "encode_png needs a [H, W, 3 or 1] uint8 tensor");
  const at::Tensor t = hwc_u8.contiguous().to(at::kCPU);
  Img img(vips_image_new_from_memory_copy(t.data_ptr(), static_cast<size_t>(t.numel()), static_cast<int>(t.size(1)),
                                          static_cast<int>(t.size(0)), static_cast<int>(t.size(2)),
                                          VIPS_FORMAT_UCHAR));
  if (!img.p) throw Error("cannot make a PNG (" + vips_reason() + ")");
  void* buf = nullptr;
  size_t len = 0;
  if (vips_pngsave_buffer(img.p, &buf, &len, nullptr)) throw Error("cannot encode PNG (" + vips_reason() + ")");
  std::string out(static_cast<const char*>(buf), len);
  g_free(buf);
  return out;
}

void save_png(const std::string& path, const at::Tensor& hwc_u8) {
  std::string png;
  try {
    png = encode_png(hwc_u8);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
  AtomicFile f(path);
  f.write(png.data(), png.size());
  f.commit();
}

#else
// Built without libvips (e.g. the GPU machine's minimal image): the autoencoder and datasets
// of cached latents work, decoding image files does not.
bool image_files_supported() { return false; }

namespace {
[[noreturn]] void no_vips(const std::string& path) {
  throw Error(path + ": this fluxtrain was built without libvips (install libvips-dev and reconfigure)");
}
}  // namespace
ImageSize probe_image_file(const std::string& path) { no_vips(path); }
at::Tensor load_image_file(const std::string& path) { no_vips(path); }
void save_png(const std::string& path, const at::Tensor&) { no_vips(path); }
std::string encode_png(const at::Tensor&) { no_vips("PNG encoding"); }
#endif  // FLUXTRAIN_WITH_VIPS

namespace {
// Pre-decoded images: a .safetensors file with "rgb" [H, W, 3] uint8 (what `fluxtrain image`
// writes). Lets prepare run where libvips is absent (the GPU benchmark machine).
at::Tensor load_rgb_safetensors(const std::string& path) {
  if (!path_exists(path)) throw Error(path + ": no such file");
  at::Tensor t;
  try {
    safetensors::File f(path);
    if (!f.contains("rgb")) throw Error(path + ": cannot decode image (no tensor 'rgb')");
    t = f.load("rgb");
  } catch (const Error& e) {
    const std::string m = e.what();
    throw Error(m.rfind(path, 0) == 0 ? m : path + ": cannot decode image (" + m + ")");
  }
  if (t.dim() != 3 || t.size(2) != 3 || t.scalar_type() != at::kByte || t.size(0) == 0 || t.size(1) == 0)
    throw Error(path + ": cannot decode image ('rgb' must be [H, W, 3] uint8)");
  return t.contiguous();
}
}  // namespace

ImageSize probe_image(const std::string& path) {
  if (file_extension(path) == ".safetensors") {
    const at::Tensor t = load_rgb_safetensors(path);
    return {t.size(1), t.size(0)};
  }
  return probe_image_file(path);
}

at::Tensor load_image_rgb8(const std::string& path) {
  if (file_extension(path) == ".safetensors") return load_rgb_safetensors(path);
  return load_image_file(path);
}

at::Tensor resize_rgb8(const at::Tensor& hwc_u8, int64_t width, int64_t height, ResizeFilter filter) {
  check_input(hwc_u8.dim() == 3 && hwc_u8.scalar_type() == at::kByte, "resize: expected [H, W, C] uint8");
  check_input(width > 0 && height > 0, "resize: target size must be positive");
  if (hwc_u8.size(0) == height && hwc_u8.size(1) == width) return hwc_u8;
  // Pillow resizes in two separable passes; LibTorch's antialiased bilinear uses the same
  // triangle filter scaled by the shrink factor (torchvision matches Pillow with it).
  const at::Tensor x = hwc_u8.permute({2, 0, 1}).unsqueeze(0).to(at::kFloat);
  at::Tensor y;
  if (filter == ResizeFilter::Bilinear) {
    y = at::_upsample_bilinear2d_aa(x, {height, width}, /*align_corners=*/false);
  } else {
    const bool shrinking = height <= x.size(2) && width <= x.size(3);
    y = shrinking ? at::adaptive_avg_pool2d(x, {height, width})
                  : at::upsample_bilinear2d(x, {height, width}, /*align_corners=*/false);
  }
  return y.squeeze(0).permute({1, 2, 0}).round().clamp(0, 255).to(at::kByte).contiguous();
}

at::Tensor rgb8_to_unit(const at::Tensor& hwc_u8) {
  return hwc_u8.permute({2, 0, 1}).to(at::kFloat).div(127.5).sub(1.0).contiguous();
}

at::Tensor unit_to_rgb8(const at::Tensor& chw) {
  return chw.to(at::kFloat).add(1.0).mul(127.5).round().clamp(0, 255).to(at::kByte).permute({1, 2, 0}).contiguous();
}

}  // namespace fluxtrain
