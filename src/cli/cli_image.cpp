// fluxtrain image: decodes one image file exactly as prepare does (libvips: orientation, ICC,
// 16-bit, palette, alpha on white) and writes the pixels, so that the decoding can be compared
// with another library (tests/py/test_image_io.py compares with Pillow) or inspected.
//   --input FILE --output OUT.safetensors: tensor "rgb" [H, W, 3] uint8
//   --resize W,H [--filter bilinear|area]: resized first;  --png OUT.png: also written as PNG
#include <cstdio>
#include <iostream>

#include <boost/program_options.hpp>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/limits.h"
#include "core/safetensors.h"
#include "data/image_io.h"

namespace po = boost::program_options;

namespace fluxtrain {

int cmd_image(int argc, char** argv) {
  std::string input, output, resize, filter = "bilinear", png;
  po::options_description desc("image options");
  desc.add_options()
      ("input", po::value(&input)->required(), "image file (PNG, JPEG, WebP, TIFF, ...)")
      ("output", po::value(&output), "output .safetensors with 'rgb' [H, W, 3] uint8")
      ("resize", po::value(&resize), "W,H: resize before writing")
      ("filter", po::value(&filter)->default_value(filter), "bilinear (Pillow's) or area")
      ("png", po::value(&png), "also write the pixels as a PNG file");
  po::variables_map vm;
  if (!parse_command_line("image", desc, argc, argv, vm)) return 0;
  if (output.empty() && png.empty()) throw Error("give --output and/or --png");
  if (filter != "bilinear" && filter != "area") throw Error("--filter must be bilinear or area, got '" + filter + "'");
  if (!output.empty()) check_output_file("--output", output, {{"--input", input}});
  if (!png.empty()) check_output_file("--png", png, {{"--input", input}});
  long w = 0, h = 0;  // --resize, checked before decoding
  if (!resize.empty()) {
    if (std::sscanf(resize.c_str(), "%ld,%ld", &w, &h) != 2 || w <= 0 || h <= 0 || w > limits::kMaxImageSize ||
        h > limits::kMaxImageSize)
      throw Error("--resize must be W,H with integers in [1, " + std::to_string(limits::kMaxImageSize) + "], got '" +
                  resize + "'");
  }
  at::Tensor rgb = load_image_rgb8(input);
  if (!resize.empty()) rgb = resize_rgb8(rgb, w, h, filter == "area" ? ResizeFilter::Area : ResizeFilter::Bilinear);
  if (!output.empty()) safetensors::save(output, {{"rgb", rgb.contiguous()}}, {{"source", input}});
  if (!png.empty()) save_png(png, rgb);
  std::cout << (output.empty() ? png : output) << "\n";
  return 0;
}

}  // namespace fluxtrain
