// fluxtrain estimate: predicted peak GPU memory of a training configuration (docs/memory.md),
// from its INI file and flags alone -- no model files (FLUX.1-dev dimensions unless --size).
#include "cli/cli_estimate.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>

#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "core/error.h"
#include "model/model_options.h"
#include "core/limits.h"
#include "core/fs.h"

namespace po = boost::program_options;

namespace fluxtrain {
namespace {

struct Raw {
  std::string size = "flux-dev", mixed_precision = "bf16", lora_mode = "easycontrol", checkpoint_attention = "auto";
  int64_t cond_size = 512, noise_size = 1024, train_batch_size = 1, lora_num = 1, txt_len = 512;
  std::vector<std::string> ranks{"128"};
  std::string lora_targets;  // standard mode, comma-separated diffusers names
  bool gradient_checkpointing = false, train_text_encoder = false, train_text_encoder_one_only = false;
  bool shard_weights = false;
  int64_t text_encoder_rank = 64, world_size = 1;
  dist::LowMemoryOptions low_memory;
};

void declare(po::options_description& d, Raw& r) {
  auto bv = [](bool* p) { return po::value<bool>(p)->default_value(false)->implicit_value(true)->value_name("BOOL"); };
  d.add_options()
      ("size", po::value(&r.size)->default_value(r.size), "model dimensions: flux-dev, flux-schnell or tiny")
      ("cond_size", po::value(&r.cond_size)->default_value(r.cond_size), "condition image pixels")
      ("noise_size", po::value(&r.noise_size)->default_value(r.noise_size), "target image pixels")
      ("train_batch_size", po::value(&r.train_batch_size)->default_value(r.train_batch_size), "samples per micro-batch")
      ("lora_mode", po::value(&r.lora_mode)->default_value(r.lora_mode), "easycontrol | standard")
      ("lora_num", po::value(&r.lora_num)->default_value(r.lora_num), "conditions (easycontrol)")
      ("lora_targets", po::value(&r.lora_targets), "standard mode: adapted linears (to_q,to_k,...; default q, k, v, out)")
      ("ranks", po::value(&r.ranks)->multitoken()->default_value(r.ranks, "128"), "LoRA rank(s); the largest counts")
      ("txt_len", po::value(&r.txt_len)->default_value(r.txt_len), "T5 tokens")
      ("mixed_precision", po::value(&r.mixed_precision)->default_value(r.mixed_precision), "bf16 | no")
      ("gradient_checkpointing", bv(&r.gradient_checkpointing), "recompute each block in backward")
      ("checkpoint_attention", po::value(&r.checkpoint_attention)->default_value(r.checkpoint_attention),
       "auto | on | off: checkpointed blocks keep their attention output (train's flag)")
      ("train_text_encoder", bv(&r.train_text_encoder), "both text encoders trained")
      ("train_text_encoder_one_only", bv(&r.train_text_encoder_one_only), "CLIP trained, T5 frozen")
      ("text_encoder_rank", po::value(&r.text_encoder_rank)->default_value(r.text_encoder_rank), "text-encoder LoRA rank")
      ("shard_weights", bv(&r.shard_weights), "frozen blocks sharded over --world_size ranks")
      ("world_size", po::value(&r.world_size)->default_value(r.world_size), "ranks (one per GPU)");
  dist::add_low_memory_options(d, r.low_memory);
}

// Every training option that does not change peak memory is accepted in the INI and ignored.
MemoryEstimateInput to_input(const Raw& r) {
  MemoryEstimateInput in;
  try {
    in.model = FluxConfig::preset(r.size);
  } catch (const Error&) {
    throw Error("--size must be flux-dev, flux-schnell or tiny, got '" + r.size + "'");
  }
  in.cond_size = r.cond_size;
  in.noise_size = r.noise_size;
  in.batch = r.train_batch_size;
  if (r.lora_mode != "easycontrol" && r.lora_mode != "standard")
    throw Error("--lora_mode must be easycontrol or standard, got '" + r.lora_mode + "'");
  in.easycontrol = r.lora_mode == "easycontrol";
  in.num_conditions = r.lora_num;
  for (size_t p = 0; !r.lora_targets.empty() && p <= r.lora_targets.size();) {
    const size_t q = std::min(r.lora_targets.find(',', p), r.lora_targets.size());
    std::string t = r.lora_targets.substr(p, q - p);
    t.erase(0, t.find_first_not_of(" \t"));
    t.erase(t.find_last_not_of(" \t") + 1);
    if (!t.empty()) in.lora_targets.push_back(t);
    p = q + 1;
  }
  in.lora_rank = 0;
  for (const std::string& list : r.ranks) {
    size_t p = 0;
    while (p <= list.size()) {
      const size_t q = std::min(list.find(',', p), list.size());
      const std::string item = list.substr(p, q - p);
      if (!item.empty()) {
        try {
          in.lora_rank = std::max<int64_t>(in.lora_rank, std::stoll(item));
        } catch (const std::exception&) {
          throw Error("--ranks: '" + item + "' is not an integer");
        }
      }
      p = q + 1;
    }
  }
  in.txt_len = r.txt_len;
  if (r.mixed_precision != "bf16" && r.mixed_precision != "no")
    throw Error("--mixed_precision must be bf16 or no, got '" + r.mixed_precision + "'");
  in.compute_bytes = r.mixed_precision == "bf16" ? 2 : 4;
  in.gradient_checkpointing = r.gradient_checkpointing;
  in.checkpoint_attention = checkpoint_attention_enabled(r.checkpoint_attention,
                                                         r.low_memory.fp8() || r.low_memory.streams());
  in.train_clip = r.train_text_encoder || r.train_text_encoder_one_only;
  in.train_t5 = r.train_text_encoder && !r.train_text_encoder_one_only;
  in.text_encoder_rank = r.text_encoder_rank;
  in.shard_weights = r.shard_weights;
  in.world_size = r.world_size;
  in.low_memory = r.low_memory;
  in.validate();
  return in;
}

}  // namespace

EstimateOptions::EstimateOptions() : desc_("estimate options") {
  static Raw unused;  // only for the help text: resolve() binds a fresh Raw each time
  declare(desc_, unused);
}

MemoryEstimateInput EstimateOptions::resolve(const std::string& config_file, int argc, char** argv) const {
  Raw raw;
  po::options_description d;
  declare(d, raw);
  po::variables_map vm;
  // Command line first: po::store keeps the first value it sees, so the file cannot override it.
  try {
    po::store(po::command_line_parser(argc, argv).options(d).allow_unregistered().run(), vm);
  } catch (const po::error& e) {
    throw Error(std::string("bad flag: ") + e.what());
  }
  if (!config_file.empty()) {
    limits::check_config_file(config_file);  // a directory would read as empty
    std::ifstream f(config_file);
    if (!f) throw Error("--config " + config_file + ": cannot open file");
    try {
      auto parsed = po::parse_config_file<char>(f, d, /*allow_unregistered=*/true);
      std::vector<po::option> kept;
      for (auto& o : parsed.options) {
        // "[lora]\nranks = 64" arrives as "lora.ranks": sections are for readability only.
        const std::string name = o.string_key.substr(o.string_key.rfind('.') + 1);
        if (!d.find_nothrow(name, false)) continue;  // not about memory
        o.string_key = name;
        o.unregistered = false;
        kept.push_back(o);
      }
      parsed.options = kept;
      po::store(parsed, vm);
    } catch (const po::error& e) {
      throw Error(config_file + ": " + e.what());
    }
  }
  try {
    po::store(po::parsed_options(&d), vm);  // defaults for the rest
    po::notify(vm);
  } catch (const po::error& e) {
    throw Error(std::string("bad flag: ") + e.what());
  }
  return to_input(raw);
}

std::string find_configs_dir() {
  if (const char* e = std::getenv("FLUXTRAIN_CONFIGS")) return e;
  std::vector<std::string> candidates{"configs"};
  char exe[4096];
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n > 0) {
    std::string dir(exe, static_cast<size_t>(n));
    for (int up = 0; up < 3; ++up) {
      dir = dir.substr(0, dir.rfind('/'));
      candidates.push_back(dir + "/configs");
    }
  }
  for (const std::string& c : candidates)
    if (std::ifstream(c + "/standard.ini")) return c;
  return "";
}

const std::vector<PresetTier>& preset_tiers() {
  static const std::vector<PresetTier> tiers = {
      {"standard.ini", "launch/train_subject_with_text_encoder_fixed.sh", 16},
      {"text-encoder-one-only.ini", "launch/train_subject_text_encoder_one_only.sh", 14},
      {"text-encoder-one-low-memory.ini", "launch/train_subject_text_encoder_one_low_memory.sh", 8},
      {"ultra-low.ini", "", 6},
      {"no-text-encoder.ini", "", 6},
      {"low-vram-4gb.ini", "", 4},
  };
  return tiers;
}

int cmd_estimate(int argc, char** argv) {
  EstimateOptions opts;
  std::string config;
  bool json = false;
  po::options_description desc("estimate options");
  desc.add_options()
      ("config", po::value(&config), "training INI file (configs/*.ini); its options, then the flags below")
      ("json", po::bool_switch(&json), "print one JSON line instead of the table");
  desc.add(opts.description());
  po::variables_map vm;
  if (!parse_command_line("estimate", desc, argc, argv, vm)) return 0;
  const MemoryEstimateInput in = opts.resolve(config, argc, argv);
  const MemoryEstimate m = estimate_memory(in);
  if (json) {
    nlohmann::json j = m.to_json();
    j["config"] = config;
    j["tokens_per_sample"] = in.tokens();
    std::cout << j.dump() << std::endl;
    return 0;
  }
  auto row = [](const char* what, int64_t b, const char* why) {
    std::printf("  %-22s %10s   %s\n", what, format_gib(b).c_str(), why);
  };
  std::printf("peak GPU memory of one training step%s%s (%lld tokens per sample, batch %lld)\n",
              config.empty() ? "" : ": ", config.c_str(), static_cast<long long>(in.tokens()),
              static_cast<long long>(in.batch));
  row("frozen weights", m.weights,
      !in.low_memory.fp8()       ? "compute dtype"
      : in.low_memory.fp8_keep_transposed
          ? "fp8 blocks as fp8 GEMMs, resident codes kept transposed too"
      : in.low_memory.fp8_matmul ? "fp8 blocks, multiplied as fp8 GEMMs (no dequantised block)"
                                 : "fp8 blocks, dequantised one at a time");
  row("LoRA + AdamW", m.lora, "float32 masters, gradients, two moments");
  row("activations", m.activations,
      !in.gradient_checkpointing ? "every block's saved tensors"
      : in.checkpoint_attention  ? "checkpointed blocks, attention outputs kept"
                                 : "checkpointed blocks");
  row("text encoders", m.encoders, in.train_clip || in.train_t5 ? "trained (provisional)" : "cached embeddings");
  row("= allocated peak", m.allocated(), "what max_memory_allocated reports");
  row("CUDA context", m.context, "driver view only");
  row("allocator slack", m.slack, "driver view only");
  row("= GPU peak", m.driver(), "what nvidia-smi shows");
  if (m.streamed_blocks > 0)
    std::printf("  %d blocks streamed from %s of host memory, %s per micro-batch over PCIe\n", m.streamed_blocks,
                format_gib(m.host_weights).c_str(), format_gib(m.bytes_streamed_per_step).c_str());
  std::printf("  host memory (RSS) about %s\n", format_gib(m.host_rss).c_str());
  return 0;
}

}  // namespace fluxtrain
