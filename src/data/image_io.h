// Image files through libvips (decoding, colour conversion, PNG writing) and resizing through
// LibTorch (PIL-compatible antialiased bilinear, area). No vips header appears here.
//
// Decoding gives 8-bit sRGB, [H, W, 3] uint8, whatever the file: EXIF orientation applied (JPEG,
// WebP, TIFF, PNG eXIf), an embedded ICC profile converted to sRGB, 16-bit samples reduced to 8
// bits (high byte, as Pillow's 16-bit RGB decoding does), greyscale and palette expanded to RGB,
// alpha flattened on white. Formats: whatever the installed libvips reads (PNG, JPEG, WebP, TIFF,
// GIF, ...). A missing, truncated or undecodable file is one Error line naming the file.
// A .safetensors file holding "rgb" [H, W, 3] uint8 (what `fluxtrain image` writes) is read as
// already decoded pixels (no libvips needed).
#pragma once
#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>

namespace fluxtrain {

struct ImageSize {
  int64_t width = 0, height = 0;  // after EXIF orientation
};

// Header only (no pixel decoding): size after orientation. Throws Error for unreadable files.
ImageSize probe_image(const std::string& path);

// False when built without libvips: image files can then be neither read nor written (only the
// .safetensors "rgb" stand-in is read).
bool image_files_supported();

// Full decode to [H, W, 3] uint8 sRGB (see above). Truncated data is an error, not grey pixels.
at::Tensor load_image_rgb8(const std::string& path);

// Writes [H, W, 3] (or [H, W, 1]) uint8 as PNG, atomically (temp file + rename).
void save_png(const std::string& path, const at::Tensor& hwc_u8);
// The same PNG file as bytes (for TensorBoard image summaries, core/tensorboard.h).
std::string encode_png(const at::Tensor& hwc_u8);

enum class ResizeFilter {
  Bilinear,  // Pillow's BILINEAR: triangle filter whose support widens when shrinking (antialiased)
  Area,      // box average over the source area of each output pixel
};

// [H, W, 3] uint8 -> [h, w, 3] uint8 (rounded, clamped). Within one or two levels of Pillow's
// Image.resize with the same filter (tests/py/test_image_io.py states the bound).
at::Tensor resize_rgb8(const at::Tensor& hwc_u8, int64_t width, int64_t height,
                       ResizeFilter filter = ResizeFilter::Bilinear);

// [H, W, 3] uint8 -> [3, H, W] float in [-1, 1] (ToTensor + Normalize(0.5, 0.5)), and back
// (rounded, clamped).
at::Tensor rgb8_to_unit(const at::Tensor& hwc_u8);
at::Tensor unit_to_rgb8(const at::Tensor& chw);

}  // namespace fluxtrain
