// fluxtrain vae: the FLUX autoencoder as a command-line function, so that anyone can compare it
// with another implementation (tests/py/test_autoencoder.py compares with diffusers), and its
// benchmark.
//   --encode IN.safetensors --output OUT: tensor "images" [B,3,H,W] in [-1,1] -> "latents"
//       (posterior mean, shifted and scaled as the transformer sees them) and "moments" (raw
//       mean and logvar, [B,2C,h,w]).
//   --decode IN.safetensors --output OUT: tensor "latents" [B,C,h,w] -> "images".
//   --bench: encode/decode time and peak memory at --bench_sizes with random weights (JSON lines).
//   --write_random DIR [--size flux|tiny]: a random autoencoder only (benchmarks of prepare).
#include <algorithm>
#include <chrono>
#include <iostream>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>

#include "core/device_info.h"
#include "cli/cli_common.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "encoders/autoencoder.h"
#include "encoders/autoencoder_weights.h"

namespace po = boost::program_options;

namespace fluxtrain {
namespace {

void sync(const c10::Device& d) {
  if (!d.is_cpu()) at::accelerator::synchronizeDevice(d.index() < 0 ? 0 : d.index());
}

std::vector<int64_t> parse_sizes(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    try {
      out.push_back(std::stoll(item));
    } catch (...) {
      throw Error("--bench_sizes: '" + item + "' is not an integer");
    }
    if (out.back() <= 0 || out.back() % 16) throw Error("--bench_sizes: sizes must be positive multiples of 16");
  }
  return out;
}

// One JSON line per (size, direction): median ms over iters, peak device memory.
void run_bench(const Autoencoder& ae, const c10::Device& dev, const std::string& size_name,
               const std::vector<int64_t>& sizes, int64_t tile_from, const TileOptions& tile_opt, int warmup,
               int iters) {
  const at::ScalarType dtype = ae.weights().begin()->second.scalar_type();
  const int di = dev.index() < 0 ? 0 : dev.index();
  for (int64_t px : sizes) {
    const TileOptions tile = px >= tile_from ? tile_opt : TileOptions::none();
    // A smooth image: what a real photo looks like to the network's first layers.
    const at::Tensor ramp = at::linspace(-1, 1, px, at::TensorOptions().dtype(at::kFloat));
    const at::Tensor img = at::stack({ramp.unsqueeze(0).expand({px, px}), ramp.unsqueeze(1).expand({px, px}),
                                      (ramp.unsqueeze(0) * ramp.unsqueeze(1))})
                               .unsqueeze(0)
                               .to(dev, dtype);
    at::Tensor lat;
    for (const char* dir : {"encode", "decode"}) {
      const bool enc = dir[0] == 'e';
      std::vector<double> ms;
      double peak = 0;
      try {
        for (int i = 0; i < warmup + iters; ++i) {
          if (!dev.is_cpu() && i == warmup) at::accelerator::resetPeakStats(di);
          sync(dev);
          const auto t0 = std::chrono::steady_clock::now();
          at::Tensor out = enc ? ae.encode(img, tile) : ae.decode(lat, tile);
          sync(dev);
          if (i >= warmup) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
          if (enc) lat = out;
        }
        if (!dev.is_cpu())
          peak = static_cast<double>(at::accelerator::getDeviceStats(di).allocated_bytes[0].peak) / (1ull << 30);
        std::sort(ms.begin(), ms.end());
        nlohmann::json j = {{"name", std::string("vae_") + dir},
                            {"device", device_name(dev)},
                            {"config", {{"size", size_name}, {"pixels", px}, {"dtype", c10::toString(dtype)},
                                        {"tile_px", tile.tile_px}, {"overlap_px", tile.overlap_px}}},
                            {"ms", ms[ms.size() / 2]},
                            {"megapixels_per_s", static_cast<double>(px * px) / 1e6 / (ms[ms.size() / 2] / 1e3)},
                            {"peak_gib", peak}};
        std::cout << j.dump() << std::endl;
      } catch (const std::exception& e) {
        std::string m = e.what();
        nlohmann::json j = {{"name", std::string("vae_") + dir}, {"config", {{"pixels", px}}},
                            {"error", m.substr(0, m.find('\n'))}};
        std::cout << j.dump() << std::endl;
        if (enc) break;
      }
    }
  }
}

}  // namespace

int cmd_vae(int argc, char** argv) {
  std::string model, layout, enc_in, dec_in, output, dtype_s, device_s, size, bench_sizes, write_random;
  int64_t tile_px = 0, overlap_px = 0, tile_from = 2048;
  int warmup = 2, iters = 5;
  bool bench = false;
  po::options_description desc("vae options");
  desc.add_options()
      ("pretrained_model_name_or_path", po::value(&model), "FLUX snapshot dir, ae.safetensors or a diffusers vae/ folder")
      ("vae_layout", po::value(&layout)->default_value("auto"), "auto, bfl or diffusers")
      ("encode", po::value(&enc_in), "inputs .safetensors with 'images' [B,3,H,W] in [-1,1]")
      ("decode", po::value(&dec_in), "inputs .safetensors with 'latents' [B,C,h,w] (scaled, as encode writes)")
      ("output", po::value(&output), "output .safetensors")
      ("dtype", po::value(&dtype_s)->default_value("f32"), "compute dtype: f32, f64, bf16, f16")
      ("device", po::value(&device_s)->default_value("cpu"), "cpu or cuda[:N]")
      ("tile_size", po::value(&tile_px)->default_value(0), "tile side in pixels (0 = no tiling)")
      ("tile_overlap", po::value(&overlap_px)->default_value(128), "tile overlap in pixels")
      ("bench", po::bool_switch(&bench), "benchmark encode/decode with random weights (JSON lines)")
      ("write_random", po::value(&write_random), "write a random autoencoder of --size as DIR/ae.safetensors + DIR/vae/")
      ("size", po::value(&size)->default_value("flux"), "--bench: autoencoder size (flux or tiny)")
      ("bench_sizes", po::value(&bench_sizes)->default_value("512,1024,2048"), "--bench: image sides in pixels")
      ("tile_from", po::value(&tile_from)->default_value(2048), "--bench: tile images of this side and larger")
      ("warmup", po::value(&warmup)->default_value(2), "--bench: untimed runs")
      ("iters", po::value(&iters)->default_value(5), "--bench: timed runs");
  po::variables_map vm;
  if (!parse_command_line("vae", desc, argc, argv, vm)) return 0;
  const at::ScalarType dtype = parse_dtype(dtype_s, "--dtype");
  const c10::Device device = parse_device(device_s, "--device");
  if (vm.count("tile_size") && tile_px == 0 && vm["tile_overlap"].defaulted()) overlap_px = 0;
  const TileOptions tile{tile_px, tile_px > 0 ? overlap_px : 0};
  if (tile_px > 0 && (tile_px % 16 || overlap_px % 8 || overlap_px < 0 || overlap_px >= tile_px))
    throw Error("--tile_size must be a multiple of 16 and --tile_overlap a multiple of 8 below it");

  if (!write_random.empty()) {
    for (const auto& f : write_random_autoencoder(write_random, size, 0, dtype, "both")) std::cout << f << "\n";
    return 0;
  }
  if (bench) {
    check_input(warmup >= 0 && iters >= 1, "--warmup must be >= 0 and --iters >= 1");
    const AutoencoderConfig cfg = AutoencoderConfig::preset(size);
    Autoencoder ae(cfg, init_random_autoencoder(cfg, 0, at::kFloat));
    ae.to(at::TensorOptions().device(device).dtype(dtype));
    run_bench(ae, device, size, parse_sizes(bench_sizes), tile_from,
              tile_px > 0 ? tile : TileOptions::defaults(), warmup, iters);
    return 0;
  }
  if (model.empty()) throw Error("--pretrained_model_name_or_path is required (or --bench)");
  if (enc_in.empty() == dec_in.empty()) throw Error("give exactly one of --encode or --decode");
  if (output.empty()) throw Error("--output is required");
  check_output_file("--output", output, {{enc_in.empty() ? "--decode" : "--encode", enc_in.empty() ? dec_in : enc_in}});
  LoadedAutoencoder la = load_autoencoder(model, layout, dtype);
  Autoencoder ae(la.config, std::move(la.weights));
  ae.to(at::TensorOptions().device(device));
  safetensors::File in(enc_in.empty() ? dec_in : enc_in);
  TensorMap out;
  if (!enc_in.empty()) {
    if (!in.contains("images")) throw Error(enc_in + ": missing input tensor 'images'");
    const at::Tensor m = ae.encode_moments(in.load("images"), tile);
    out["moments"] = m.to(at::kCPU);
    out["latents"] = ((m.narrow(1, 0, la.config.latent_channels) - la.config.shift_factor) * la.config.scaling_factor)
                         .to(at::kCPU)
                         .contiguous();
  } else {
    if (!in.contains("latents")) throw Error(dec_in + ": missing input tensor 'latents'");
    out["images"] = ae.decode(in.load("latents"), tile).to(at::kCPU).contiguous();
  }
  for (auto& kv : out) kv.second = kv.second.contiguous();
  safetensors::save(output, out, {{"source", la.source}, {"layout", la.layout}});
  std::cout << output << "\n";
  return 0;
}

}  // namespace fluxtrain
