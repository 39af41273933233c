#include "core/config.h"

#include <cmath>
#include <fstream>
#include <iostream>
#include <random>
#include <set>
#include <sstream>

#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/limits.h"

namespace po = boost::program_options;

namespace fluxtrain {

std::string lora_mode_name(LoraMode m) { return m == LoraMode::EasyControl ? "easycontrol" : "standard"; }

namespace {

// Splits "64,64" / "64 64" (INI values arrive as one token) into items.
std::vector<std::string> split_list(const std::vector<std::string>& tokens) {
  std::vector<std::string> out;
  for (const auto& t : tokens) {
    std::string cur;
    for (char c : t) {
      if (c == ',' || c == ' ' || c == '\t') {
        if (!cur.empty()) out.push_back(cur);
        cur.clear();
      } else {
        cur += c;
      }
    }
    if (!cur.empty()) out.push_back(cur);
  }
  return out;
}

int64_t to_int(const std::string& flag, const std::string& s) {
  size_t pos = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &pos);
  } catch (...) {
    pos = 0;
  }
  if (pos == 0 || pos != s.size()) throw Error("--" + flag + ": '" + s + "' is not an integer");
  return v;
}

double to_double(const std::string& flag, const std::string& s) {
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (...) {
    pos = 0;
  }
  if (pos == 0 || pos != s.size()) throw Error("--" + flag + ": '" + s + "' is not a number");
  return v;
}

template <class T>
std::string join(const std::vector<T>& v) {
  std::ostringstream ss;
  for (size_t i = 0; i < v.size(); ++i) ss << (i ? "," : "") << v[i];
  return ss.str();
}

// Bound storage for list options (converted after parsing) and the signed seed.
struct Raw {
  std::vector<std::string> ranks, alphas, targets, blocks;
  std::string lora_mode = "easycontrol";
  int64_t lora_num = 1;
  int64_t seed = -1;
};

// Builds the option groups, bound to `c` and `raw`. Defaults come from the structs themselves.
std::vector<po::options_description> make_groups(RunConfig& c, Raw& raw) {
  const RunConfig d;  // defaults
  auto sv = [](std::string* p, const std::string& def) { return po::value<std::string>(p)->default_value(def); };
  auto iv = [](int64_t* p, int64_t def) { return po::value<int64_t>(p)->default_value(def); };
  auto dv = [](double* p, double def, const char* shown) {
    return po::value<double>(p)->default_value(def, shown);
  };
  auto bv = [](bool* p) { return po::value<bool>(p)->default_value(false)->implicit_value(true)->value_name("BOOL"); };

  std::vector<po::options_description> g;
  g.emplace_back("General");
  g.back().add_options()
      ("help,h", "print this help and exit")
      ("config", po::value<std::string>(&c.config_file)->value_name("FILE"),
       "INI file with any of these options (name = value; [sections] are only for readability); "
       "the command line wins")
      ("output_dir", sv(&c.checkpoint.output_dir, d.checkpoint.output_dir), "checkpoints, metrics.jsonl, lora.safetensors")
      ("seed", po::value<int64_t>(&raw.seed), "seed of every random draw (default: drawn at random, printed and stored)")
      ("device", sv(&c.model.device, d.model.device), "auto | cpu | cuda")
      ("num_threads", iv(&c.train.num_threads, d.train.num_threads), "CPU threads for LibTorch (0 = its default)");
  g.emplace_back("Model");
  g.back().add_options()
      ("pretrained_model_name_or_path", sv(&c.model.pretrained_model_name_or_path, ""),
       "FLUX.1 snapshot directory, diffusers transformer folder or BFL .safetensors file (required)")
      ("model_layout", sv(&c.model.model_layout, d.model.model_layout), "auto | bfl | diffusers")
      ("mixed_precision", sv(&c.model.mixed_precision, d.model.mixed_precision),
       "no (float32) | bf16: dtype of the frozen weights and activations; LoRA masters stay float32")
      ("gradient_checkpointing", bv(&c.model.gradient_checkpointing), "recompute each block in backward")
      ("guidance_scale", dv(&c.model.guidance_scale, d.model.guidance_scale, "1"),
       "guidance value fed to guidance-embedding models during training");
  g.emplace_back("LoRA");
  g.back().add_options()
      ("lora_mode", sv(&raw.lora_mode, "easycontrol"),
       "easycontrol (per-condition LoRA on condition tokens) | standard (plain LoRA on --lora_targets)")
      ("lora_num", iv(&raw.lora_num, 1), "number of conditions, each with its own LoRA (easycontrol)")
      ("ranks", po::value<std::vector<std::string>>(&raw.ranks)->multitoken()->default_value({"128"}, "128"),
       "LoRA rank, one per condition")
      ("network_alphas", po::value<std::vector<std::string>>(&raw.alphas)->multitoken()->default_value({"128"}, "128"),
       "LoRA alpha, one per condition (scale = alpha / rank)")
      ("lora_targets", po::value<std::vector<std::string>>(&raw.targets)->multitoken(),
       "standard mode: diffusers linear names (to_q,to_k,to_v,to_out.0,add_q_proj,...,proj_mlp,proj_out)")
      ("lora_blocks", po::value<std::vector<std::string>>(&raw.blocks)->multitoken(),
       "standard mode: only these global block indices (default: all)");
  g.emplace_back("Data");
  g.back().add_options()
      ("train_data", sv(&c.data.train_data, ""), "HDF5 dataset of encoded samples (docs/dataset.md; required)")
      ("train_batch_size", iv(&c.data.train_batch_size, d.data.train_batch_size), "samples per micro-batch")
      ("cond_size", iv(&c.data.cond_size, d.data.cond_size), "condition image size in pixels (multiple of 16)")
      ("noise_size", iv(&c.data.noise_size, d.data.noise_size), "target image size in pixels (multiple of 16)")
      ("prefetch_batches", iv(&c.data.prefetch_batches, d.data.prefetch_batches),
       "micro-batches the background reader keeps ready");
  g.emplace_back("Optimisation");
  g.back().add_options()
      ("learning_rate", dv(&c.train.learning_rate, d.train.learning_rate, "1e-4"), "AdamW learning rate")
      ("adam_beta1", dv(&c.train.adam_beta1, d.train.adam_beta1, "0.9"), "")
      ("adam_beta2", dv(&c.train.adam_beta2, d.train.adam_beta2, "0.999"), "")
      ("adam_weight_decay", dv(&c.train.adam_weight_decay, d.train.adam_weight_decay, "1e-4"), "decoupled weight decay")
      ("adam_epsilon", dv(&c.train.adam_epsilon, d.train.adam_epsilon, "1e-8"), "")
      ("max_grad_norm", dv(&c.train.max_grad_norm, d.train.max_grad_norm, "1"), "clip the global gradient norm (0 = off)")
      ("gradient_accumulation_steps", iv(&c.train.gradient_accumulation_steps, d.train.gradient_accumulation_steps),
       "micro-batches per update")
      ("max_train_steps", iv(&c.train.max_train_steps, d.train.max_train_steps),
       "updates to run (0 = num_train_epochs worth)")
      ("num_train_epochs", iv(&c.train.num_train_epochs, d.train.num_train_epochs), "used when max_train_steps is 0")
      ("max_nonfinite_steps", iv(&c.train.max_nonfinite_steps, d.train.max_nonfinite_steps),
       "stop after this many updates in a row skipped for a non-finite loss or gradient");
  g.emplace_back("Learning-rate schedule");
  g.back().add_options()
      ("lr_scheduler", sv(&c.train.lr_scheduler, d.train.lr_scheduler), "constant | constant_with_warmup | linear | cosine")
      ("lr_warmup_steps", iv(&c.train.lr_warmup_steps, d.train.lr_warmup_steps), "linear warm-up (not used by constant)");
  g.emplace_back("Timesteps");
  g.back().add_options()
      ("weighting_scheme", sv(&c.train.weighting_scheme, d.train.weighting_scheme),
       "timestep density: none (uniform) | logit_normal | mode | sigmoid")
      ("logit_mean", dv(&c.train.logit_mean, d.train.logit_mean, "0"), "logit_normal mean")
      ("logit_std", dv(&c.train.logit_std, d.train.logit_std, "1"), "logit_normal standard deviation")
      ("mode_scale", dv(&c.train.mode_scale, d.train.mode_scale, "1.29"), "mode scheme scale, in [0, 1.75)")
      ("sigmoid_scale", dv(&c.train.sigmoid_scale, d.train.sigmoid_scale, "1"), "sigmoid scheme: sigmoid(scale * N(0,1))")
      ("timestep_shift", dv(&c.train.timestep_shift, d.train.timestep_shift, "1"),
       "sigma' = shift*sigma / (1 + (shift-1)*sigma); 1 = none");
  g.emplace_back("Checkpoints");
  g.back().add_options()
      ("checkpointing_steps", iv(&c.checkpoint.checkpointing_steps, d.checkpoint.checkpointing_steps),
       "write a checkpoint every N updates (and at the end)")
      ("checkpoints_total_limit", iv(&c.checkpoint.checkpoints_total_limit, d.checkpoint.checkpoints_total_limit),
       "keep at most N checkpoints (0 = all)")
      ("resume_from_checkpoint", sv(&c.checkpoint.resume_from_checkpoint, ""),
       "latest (newest complete checkpoint in output_dir, if any) or a checkpoint file")
      ("overwrite_output_dir", bv(&c.checkpoint.overwrite_output_dir),
       "start a new run in an output_dir that holds another run's outputs (they are moved to previous-run-N/)");
  g.emplace_back("Validation");
  g.back().add_options()
      ("validation_steps", iv(&c.validation.validation_steps, d.validation.validation_steps),
       "validation loss every N updates (0 = off)")
      ("validation_samples", iv(&c.validation.validation_samples, d.validation.validation_samples),
       "samples in the validation loss (fixed noise and timesteps)")
      ("test_h", iv(&c.validation.test_h, d.validation.test_h), "validation image height (multiple of 16)")
      ("test_w", iv(&c.validation.test_w, d.validation.test_w), "validation image width (multiple of 16)");
  g.emplace_back("Text encoders (validated now, trained in a later release)");
  g.back().add_options()
      ("train_text_encoder", bv(&c.text_encoder.train_text_encoder), "train LoRA on both text encoders")
      ("train_text_encoder_one_only", bv(&c.text_encoder.train_text_encoder_one_only),
       "train LoRA on text encoder one (CLIP) only")
      ("text_encoder_rank", iv(&c.text_encoder.text_encoder_rank, d.text_encoder.text_encoder_rank), "")
      ("text_encoder_alpha", dv(&c.text_encoder.text_encoder_alpha, d.text_encoder.text_encoder_alpha, "64"), "")
      ("text_encoder_lr", dv(&c.text_encoder.text_encoder_lr, d.text_encoder.text_encoder_lr, "5e-6"), "");
  g.emplace_back("Distributed (mpirun -np N fluxtrain train ...; docs/distributed.md)");
  g.back().add_options()
      ("shard_weights", bv(&c.dist.shard_weights),
       "shard the frozen transformer blocks over the ranks (always on with more than one rank; "
       "with one rank: exercises the sharded path)")
      ("shard_optimizer", bv(&c.dist.shard_optimizer),
       "reduce-scatter the LoRA gradients and keep each rank's 1/N of the AdamW state")
      ("encoder_rank", iv(&c.dist.encoder_rank, d.dist.encoder_rank),
       "rank that computes the conditioning of the global batch (used once encoders run in the trainer)")
      ("nccl_timeout", dv(&c.dist.nccl_timeout, d.dist.nccl_timeout, "600"),
       "seconds after which a stuck NCCL collective aborts the whole job")
      ("mpi_timeout", dv(&c.dist.mpi_timeout, d.dist.mpi_timeout, "600"),
       "seconds after which a stuck MPI collective (CPU runs, host values) aborts the whole job, naming the rank");
  return g;
}

// Test-only options: parsed like the others, never shown by --help.
po::options_description make_hidden(RunConfig& c) {
  po::options_description h("Debug (hidden)");
  h.add_options()
      ("debug_fail_at_step", po::value<int64_t>(&c.debug.fail_at_step)->default_value(-1),
       "throw on --debug_fail_rank once this many updates are done")
      ("debug_fail_rank", po::value<int64_t>(&c.debug.fail_rank)->default_value(0), "")
      ("debug_float64", po::value<bool>(&c.debug.float64)->default_value(false)->implicit_value(true), "")
      ("debug_save_masters", po::value<bool>(&c.debug.save_masters)->default_value(false)->implicit_value(true), "")
      ("debug_nan_at_step", po::value<int64_t>(&c.debug.nan_at_step)->default_value(-1),
       "--debug_nan_rank's first update at this step counts as non-finite")
      ("debug_nan_rank", po::value<int64_t>(&c.debug.nan_rank)->default_value(0), "");
  return h;
}

// Turns Boost's messages into ours: one line, the flag spelled as the user typed it.
[[noreturn]] void rethrow_po(const po::error& e, const std::string& where) {
  std::string msg = e.what();
  if (auto* u = dynamic_cast<const po::unknown_option*>(&e))
    msg = "unknown option " + u->get_option_name() + " (fluxtrain train --help lists them)";
  throw Error(where.empty() ? msg : where + ": " + msg);
}

}  // namespace

ParsedArgs parse_train_args(int argc, const char* const* argv, std::ostream& out) {
  ParsedArgs result;
  RunConfig& c = result.config;
  Raw raw;
  auto groups = make_groups(c, raw);
  po::options_description visible("fluxtrain train: LoRA training of FLUX.1 (EasyControl condition LoRA or plain LoRA)");
  for (auto& g : groups) visible.add(g);
  po::options_description all;
  all.add(visible).add(make_hidden(c));

  // No prefix guessing ("--rank" must not silently mean "--ranks"); no sticky short options.
  const int style = po::command_line_style::allow_long | po::command_line_style::long_allow_adjacent |
                    po::command_line_style::long_allow_next | po::command_line_style::allow_short |
                    po::command_line_style::short_allow_next | po::command_line_style::allow_dash_for_short;
  po::variables_map vm;
  try {
    auto parsed = po::command_line_parser(argc, const_cast<char**>(argv)).options(all).style(style)
                      .allow_unregistered().run();
    for (const auto& o : parsed.options) {
      if (o.position_key >= 0) {
        std::string hint = (o.value.size() == 1 && (o.value[0] == "true" || o.value[0] == "false"))
                               ? " (boolean flags take --flag or --flag=true/false)"
                               : "";
        throw Error("unexpected argument '" + (o.value.empty() ? std::string() : o.value[0]) + "'" + hint);
      }
      if (o.unregistered)
        throw Error("unknown option " + (o.original_tokens.empty() ? o.string_key : o.original_tokens[0]) +
                    " (fluxtrain train --help lists them)");
    }
    po::store(parsed, vm);
  } catch (const po::error& e) {
    rethrow_po(e, "");
  }
  if (vm.count("help")) {
    out << visible << "\n";
    result.help = true;
    return result;
  }
  if (vm.count("config")) {
    const std::string file = vm["config"].as<std::string>();
    limits::check_config_file(file);
    std::ifstream in(file);
    if (!in) throw Error("--config " + file + ": cannot open file");
    try {
      auto parsed = po::parse_config_file<char>(in, all, /*allow_unregistered=*/true);
      for (auto& o : parsed.options) {
        if (!o.unregistered) {
          if (o.string_key == "config" || o.string_key == "help")
            throw Error(file + ": unknown option '" + o.string_key + "' (not allowed in an INI file)");
          continue;
        }
        // "[lora]\nranks = 64" arrives as "lora.ranks": sections are for readability only.
        std::string name = o.string_key.substr(o.string_key.rfind('.') + 1);
        if (name == "config" || name == "help" || !all.find_nothrow(name, false))
          throw Error(file + ": unknown option '" + o.string_key + "'");
        o.string_key = name;
        o.unregistered = false;
      }
      po::store(parsed, vm);  // keeps values already set on the command line
    } catch (const po::error& e) {
      rethrow_po(e, file);
    }
  }
  try {
    po::notify(vm);
  } catch (const po::error& e) {
    rethrow_po(e, "");
  }

  // List options and enums that need conversion.
  if (raw.lora_mode == "easycontrol") c.lora.mode = LoraMode::EasyControl;
  else if (raw.lora_mode == "standard") c.lora.mode = LoraMode::Standard;
  else throw Error("--lora_mode must be easycontrol or standard, got '" + raw.lora_mode + "'");
  limits::check_range("--lora_num", raw.lora_num, 1, limits::kMaxLoraNum);  // before the cast to int
  c.lora.lora_num = static_cast<int>(raw.lora_num);
  c.lora.ranks.clear();
  for (const auto& s : split_list(raw.ranks)) c.lora.ranks.push_back(to_int("ranks", s));
  c.lora.alphas.clear();
  for (const auto& s : split_list(raw.alphas)) c.lora.alphas.push_back(to_double("network_alphas", s));
  c.lora.targets = split_list(raw.targets);
  c.lora.blocks.clear();
  for (const auto& s : split_list(raw.blocks)) c.lora.blocks.push_back(static_cast<int>(limits::parse_int("--lora_blocks", s, 0, limits::kMaxBlockIndex)));
  if (vm.count("seed")) {
    if (raw.seed < 0) throw Error("--seed must be a non-negative integer, got " + std::to_string(raw.seed));
    c.train.seed = static_cast<uint64_t>(raw.seed);
    c.train.seed_given = true;
  } else {
    // Unseeded runs are still reproducible: the drawn seed is printed and stored in checkpoints.
    std::random_device rd;
    c.train.seed = ((static_cast<uint64_t>(rd()) << 32) | rd()) & 0x7fffffffffffffffull;
    c.train.seed_given = false;
  }
  c.validate();
  return result;
}

void RunConfig::validate() const {
  auto need = [](bool ok, const std::string& msg) {
    if (!ok) throw Error(msg);
  };
  auto one_of = [](const std::string& flag, const std::string& v, const std::set<std::string>& allowed) {
    if (allowed.count(v)) return;
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : " | ") + a;
    throw Error("--" + flag + " must be one of " + list + ", got '" + v + "'");
  };
  auto positive = [&](const std::string& flag, int64_t v) {
    need(v > 0, "--" + flag + " must be positive, got " + std::to_string(v));
  };
  auto non_negative = [&](const std::string& flag, int64_t v) {
    need(v >= 0, "--" + flag + " must be >= 0, got " + std::to_string(v));
  };
  auto mult16 = [&](const std::string& flag, int64_t v) {
    need(v > 0 && v % 16 == 0,
         "--" + flag + " " + std::to_string(v) + " is not a positive multiple of 16 (8x VAE downsampling, 2x2 patches)");
  };
  auto finite = [&](const std::string& flag, double v) {
    need(std::isfinite(v), "--" + flag + " must be a finite number");
  };

  // Model
  need(!model.pretrained_model_name_or_path.empty(), "--pretrained_model_name_or_path is required");
  one_of("model_layout", model.model_layout, {"auto", "bfl", "diffusers"});
  if (model.mixed_precision == "fp16")
    throw Error("--mixed_precision fp16 is not supported (no loss scaling); use bf16 or no");
  one_of("mixed_precision", model.mixed_precision, {"no", "bf16"});
  one_of("device", model.device, {"auto", "cpu", "cuda"});
  finite("guidance_scale", model.guidance_scale);

  // LoRA (count and range checks live with LoraConfig)
  lora.validate();
  if (lora.mode == LoraMode::EasyControl) {
    need(lora.targets.empty(), "--lora_targets only applies to --lora_mode standard");
    need(lora.blocks.empty(), "--lora_blocks only applies to --lora_mode standard");
  }
  for (double a : lora.alphas) need(std::isfinite(a) && a > 0, "--network_alphas values must be positive");
  for (int b : lora.blocks) need(b >= 0, "--lora_blocks values must be >= 0");

  // Data
  need(!data.train_data.empty(), "--train_data is required (an HDF5 dataset, see docs/dataset.md)");
  positive("train_batch_size", data.train_batch_size);
  mult16("cond_size", data.cond_size);
  mult16("noise_size", data.noise_size);
  positive("prefetch_batches", data.prefetch_batches);

  // Optimisation
  finite("learning_rate", train.learning_rate);
  need(train.learning_rate > 0, "--learning_rate must be positive");
  need(train.adam_beta1 >= 0 && train.adam_beta1 < 1, "--adam_beta1 must be in [0, 1)");
  need(train.adam_beta2 >= 0 && train.adam_beta2 < 1, "--adam_beta2 must be in [0, 1)");
  need(std::isfinite(train.adam_weight_decay) && train.adam_weight_decay >= 0, "--adam_weight_decay must be >= 0");
  need(std::isfinite(train.adam_epsilon) && train.adam_epsilon > 0, "--adam_epsilon must be positive");
  need(std::isfinite(train.max_grad_norm) && train.max_grad_norm >= 0, "--max_grad_norm must be >= 0 (0 = off)");
  positive("gradient_accumulation_steps", train.gradient_accumulation_steps);
  non_negative("max_train_steps", train.max_train_steps);
  if (train.max_train_steps == 0) positive("num_train_epochs", train.num_train_epochs);
  positive("max_nonfinite_steps", train.max_nonfinite_steps);
  non_negative("num_threads", train.num_threads);
  one_of("lr_scheduler", train.lr_scheduler, {"constant", "constant_with_warmup", "linear", "cosine"});
  non_negative("lr_warmup_steps", train.lr_warmup_steps);
  if (train.max_train_steps > 0 && (train.lr_scheduler == "linear" || train.lr_scheduler == "cosine"))
    need(train.lr_warmup_steps < train.max_train_steps,
         "--lr_warmup_steps " + std::to_string(train.lr_warmup_steps) + " must be below --max_train_steps " +
             std::to_string(train.max_train_steps) + " for --lr_scheduler " + train.lr_scheduler);

  // Timesteps
  one_of("weighting_scheme", train.weighting_scheme, {"none", "logit_normal", "mode", "sigmoid"});
  finite("logit_mean", train.logit_mean);
  need(std::isfinite(train.logit_std) && train.logit_std > 0, "--logit_std must be positive");
  // Beyond 1/(pi/2 - 1) the mode map stops being monotone and leaves [0, 1].
  need(train.mode_scale >= 0 && train.mode_scale < 1.75, "--mode_scale must be in [0, 1.75)");
  need(std::isfinite(train.sigmoid_scale) && train.sigmoid_scale > 0, "--sigmoid_scale must be positive");
  need(std::isfinite(train.timestep_shift) && train.timestep_shift > 0, "--timestep_shift must be positive");

  // Checkpoints
  need(!checkpoint.output_dir.empty(), "--output_dir must not be empty");
  positive("checkpointing_steps", checkpoint.checkpointing_steps);
  non_negative("checkpoints_total_limit", checkpoint.checkpoints_total_limit);

  // Validation
  non_negative("validation_steps", validation.validation_steps);
  positive("validation_samples", validation.validation_samples);
  mult16("test_h", validation.test_h);
  mult16("test_w", validation.test_w);

  // Distributed (encoder_rank < world size is checked by the trainer, which knows the world)
  non_negative("encoder_rank", dist.encoder_rank);
  need(std::isfinite(dist.nccl_timeout) && dist.nccl_timeout > 0, "--nccl_timeout must be a positive number of seconds");
  need(debug.fail_rank >= 0, "--debug_fail_rank must be >= 0");
  need(debug.nan_rank >= 0, "--debug_nan_rank must be >= 0");

  // Text encoders
  need(!(text_encoder.train_text_encoder && text_encoder.train_text_encoder_one_only),
       "--train_text_encoder and --train_text_encoder_one_only contradict each other: choose one "
       "(both encoders, or text encoder one only)");
  positive("text_encoder_rank", text_encoder.text_encoder_rank);
  need(std::isfinite(text_encoder.text_encoder_alpha) && text_encoder.text_encoder_alpha > 0,
       "--text_encoder_alpha must be positive");
  need(std::isfinite(text_encoder.text_encoder_lr) && text_encoder.text_encoder_lr > 0,
       "--text_encoder_lr must be positive");
  limits::check_run_limits(*this);  // upper bounds (core/limits.h)
}

nlohmann::json RunConfig::to_json() const {
  using nlohmann::json;
  json j;
  j["config_file"] = config_file;
  j["model"] = {{"pretrained_model_name_or_path", model.pretrained_model_name_or_path},
                {"model_layout", model.model_layout},
                {"mixed_precision", model.mixed_precision},
                {"device", model.device},
                {"gradient_checkpointing", model.gradient_checkpointing},
                {"guidance_scale", model.guidance_scale}};
  j["lora"] = {{"lora_mode", lora_mode_name(lora.mode)},
               {"lora_num", lora.lora_num},
               {"ranks", lora.ranks},
               {"network_alphas", lora.alphas},
               {"lora_targets", lora.targets},
               {"lora_blocks", lora.blocks}};
  j["data"] = {{"train_data", data.train_data},
               {"train_batch_size", data.train_batch_size},
               {"cond_size", data.cond_size},
               {"noise_size", data.noise_size},
               {"prefetch_batches", data.prefetch_batches}};
  j["train"] = {{"learning_rate", train.learning_rate},
                {"lr_scheduler", train.lr_scheduler},
                {"lr_warmup_steps", train.lr_warmup_steps},
                {"adam_beta1", train.adam_beta1},
                {"adam_beta2", train.adam_beta2},
                {"adam_weight_decay", train.adam_weight_decay},
                {"adam_epsilon", train.adam_epsilon},
                {"max_grad_norm", train.max_grad_norm},
                {"gradient_accumulation_steps", train.gradient_accumulation_steps},
                {"max_train_steps", train.max_train_steps},
                {"num_train_epochs", train.num_train_epochs},
                {"weighting_scheme", train.weighting_scheme},
                {"logit_mean", train.logit_mean},
                {"logit_std", train.logit_std},
                {"mode_scale", train.mode_scale},
                {"sigmoid_scale", train.sigmoid_scale},
                {"timestep_shift", train.timestep_shift},
                {"max_nonfinite_steps", train.max_nonfinite_steps},
                {"seed", train.seed},
                {"seed_given", train.seed_given},
                {"num_threads", train.num_threads}};
  j["checkpoint"] = {{"output_dir", checkpoint.output_dir},
                     {"checkpointing_steps", checkpoint.checkpointing_steps},
                     {"checkpoints_total_limit", checkpoint.checkpoints_total_limit},
                     {"resume_from_checkpoint", checkpoint.resume_from_checkpoint},
                     {"overwrite_output_dir", checkpoint.overwrite_output_dir}};
  j["validation"] = {{"validation_steps", validation.validation_steps},
                     {"validation_samples", validation.validation_samples},
                     {"test_h", validation.test_h},
                     {"test_w", validation.test_w}};
  j["text_encoder"] = {{"train_text_encoder", text_encoder.train_text_encoder},
                       {"train_text_encoder_one_only", text_encoder.train_text_encoder_one_only},
                       {"text_encoder_rank", text_encoder.text_encoder_rank},
                       {"text_encoder_alpha", text_encoder.text_encoder_alpha},
                       {"text_encoder_lr", text_encoder.text_encoder_lr}};
  j["distributed"] = {{"shard_weights", dist.shard_weights},
                      {"shard_optimizer", dist.shard_optimizer},
                      {"encoder_rank", dist.encoder_rank},
                      {"nccl_timeout", dist.nccl_timeout},
                      {"mpi_timeout", dist.mpi_timeout}};
  return j;
}

}  // namespace fluxtrain
