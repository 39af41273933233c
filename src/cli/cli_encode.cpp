// fluxtrain encode: FLUX's text conditioning as a file-to-file function, so that fluxtrain's
// tokenizers and encoders can be checked against any other implementation (docs/encoders.md).
//   prompts (one a line, "\n" / "\t" / "\\" escaped) -> clip_input_ids [N, 77], t5_input_ids [N, L]
//   and, unless --tokenize_only, pooled_prompt_embeds [N, 768] and prompt_embeds [N, L, 4096].
// --bench instead times the encoders at real sizes with random weights (JSON lines).
#include <algorithm>
#include <chrono>
#include <iostream>

#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/limits.h"
#include "core/fs.h"
#include "core/median.h"
#include "core/safetensors.h"
#include "encoders/text_encoders.h"
#include "encoders/tiny_text_encoders.h"

namespace po = boost::program_options;

namespace fluxtrain {

// One prompt a line; "\n", "\t" and "\\" inside a line stand for newline, tab and backslash.
std::vector<std::string> read_prompts_file(const std::string& path) {
  if (!path_exists(path)) throw Error(path + ": missing (--prompts: one prompt a line)");
  const std::string text = read_text_file(path);
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    std::string p;
    for (size_t i = 0; i < line.size(); ++i) {
      if (line[i] == '\\' && i + 1 < line.size() && (line[i + 1] == 'n' || line[i + 1] == 't' || line[i + 1] == '\\')) {
        p += line[i + 1] == 'n' ? '\n' : line[i + 1] == 't' ? '\t' : '\\';
        ++i;
      } else {
        p += line[i];
      }
    }
    out.push_back(p);
  }
  return out;
}

namespace {

void sync(const c10::Device& d) {
  if (!d.is_cpu()) at::accelerator::synchronizeDevice(d.index() < 0 ? 0 : d.index());
}

// Encode time at real sizes (or tiny) with random weights: forward only, and forward + backward
// through a LoRA (what a training step pays).
int run_bench(const std::string& sizes, const std::string& batches_s, int64_t tokens, int iters, int64_t rank,
              at::ScalarType dtype, c10::Device dev) {
  std::vector<int64_t> batches;
  {
    std::stringstream ss(batches_s);
    std::string item;
    while (std::getline(ss, item, ','))
      batches.push_back(limits::parse_int("--bench_batches", item, 1, limits::kMaxBatch));
  }
  const bool tiny = sizes == "tiny";
  check_input(tiny || sizes == "real", "--bench_size must be real or tiny");
  const int di = dev.index() < 0 ? 0 : dev.index();
  for (const std::string enc : {"clip-l", "t5-xxl"}) {
    std::unique_ptr<ClipTextModel> clip;
    std::unique_ptr<T5Encoder> t5;
    TextEncoderLora lora;
    int64_t vocab = 0, len = 0;
    if (enc == "clip-l") {
      const ClipTextConfig c = tiny ? ClipTextConfig::tiny(16) : ClipTextConfig::clip_l();
      clip = std::make_unique<ClipTextModel>(c, random_clip_weights(c, 0, dtype, dev), "random CLIP");
      clip->to(dtype, dev);
      lora = TextEncoderLora::create(ClipTextModel::lora_targets(c), rank, static_cast<double>(rank), 0);
      vocab = c.vocab_size;
      len = c.max_position_embeddings;
    } else {
      const T5EncoderConfig c = tiny ? T5EncoderConfig::tiny(32) : T5EncoderConfig::t5_xxl();
      t5 = std::make_unique<T5Encoder>(c, random_t5_weights(c, 0, dtype, dev), "random T5");
      t5->to(dtype, dev);
      lora = TextEncoderLora::create(T5Encoder::lora_targets(c), rank, static_cast<double>(rank), 0);
      vocab = 32100;
      len = tokens;
    }
    lora.to(dev);
    const double weights_gib =
        static_cast<double>(clip ? clip->resident_bytes() : t5->resident_bytes()) / static_cast<double>(1ull << 30);
    for (int64_t b : batches) {
      for (const bool train : {false, true}) {
        for (const bool ckpt : train ? std::vector<bool>{false, true} : std::vector<bool>{false}) {
          const at::Tensor ids = at::randint(vocab, {b, len}, at::TensorOptions().dtype(at::kLong)).to(dev);
          auto once = [&] {
            if (!train) {
              at::NoGradGuard ng;
              if (clip) clip->forward(ids); else t5->forward(ids);
              return;
            }
            at::Tensor out = clip ? clip->forward(ids, &lora, ckpt).pooled : t5->forward(ids, &lora, ckpt);
            out.to(at::kFloat).square().mean().backward();
          };
          once();  // warm-up
          sync(dev);
          if (!dev.is_cpu()) at::accelerator::resetPeakStats(di);
          std::vector<double> ms;
          for (int i = 0; i < iters; ++i) {
            const auto t0 = std::chrono::steady_clock::now();
            once();
            sync(dev);
            ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
          }
          double peak = 0;
          if (!dev.is_cpu())
            peak = static_cast<double>(at::accelerator::getDeviceStats(di).allocated_bytes[0].peak) / (1ull << 30);
          nlohmann::json j = {{"name", "encode"},           {"encoder", enc},
                              {"size", sizes},              {"batch", b},
                              {"tokens", len},              {"dtype", c10::toString(dtype)},
                              {"device", dev.str()},        {"mode", train ? "lora_forward_backward" : "forward"},
                              {"gradient_checkpointing", ckpt}, {"lora_rank", train ? rank : 0},
                              {"ms", median(ms)},           {"ms_min", *std::min_element(ms.begin(), ms.end())},
                              {"iters", iters},             {"weights_gib", weights_gib},
                              {"peak_gib", peak}};
          std::cout << j.dump() << std::endl;
        }
      }
    }
  }
  return 0;
}

}  // namespace

int cmd_encode(int argc, char** argv) {
  std::string model, prompts_path, output, dtype_s, device_s, lora_path, save_lora, bench_size, bench_batches;
  int64_t max_len = 512, batch = 8, bench_tokens = 512, bench_rank = 64;
  int bench_iters = 5;
  double lora_alpha = 0;
  bool tokenize_only = false, ckpt = false, bench = false;
  po::options_description desc("encode options");
  desc.add_options()
      ("pretrained_model_name_or_path", po::value(&model), "FLUX snapshot dir (tokenizer/, text_encoder/, "
       "tokenizer_2/, text_encoder_2/)")
      ("prompts", po::value(&prompts_path), "text file, one prompt a line (\\n, \\t, \\\\ escapes)")
      ("output", po::value(&output), "output .safetensors")
      ("tokenize_only", po::bool_switch(&tokenize_only), "write token ids only; read no encoder weights")
      ("device", po::value(&device_s)->default_value("cpu"), "cpu or cuda[:N]")
      ("dtype", po::value(&dtype_s)->default_value("f32"), "compute dtype: f32, f64, bf16, f16")
      ("max_sequence_length", po::value(&max_len)->default_value(512), "T5 tokens per prompt (padded/truncated)")
      ("batch_size", po::value(&batch)->default_value(8), "prompts encoded at a time")
      ("text_encoder_lora", po::value(&lora_path), "text encoder LoRA .safetensors (diffusers/peft/fluxtrain keys)")
      ("text_encoder_alpha", po::value(&lora_alpha)->default_value(0), "alpha for a LoRA file without metadata "
       "(0: alpha = rank)")
      ("save_text_encoder_lora", po::value(&save_lora), "write the LoRA read by --text_encoder_lora again, in the "
       "diffusers layout fluxtrain saves (for checking it with diffusers)")
      ("gradient_checkpointing", po::bool_switch(&ckpt), "run layers through the checkpointing path")
      ("bench", po::bool_switch(&bench), "time the encoders with random weights instead (JSON lines)")
      ("bench_size", po::value(&bench_size)->default_value("real"), "bench: real (CLIP-L, T5-XXL) or tiny")
      ("bench_batches", po::value(&bench_batches)->default_value("1,8"), "bench: batch sizes")
      ("bench_tokens", po::value(&bench_tokens)->default_value(512), "bench: T5 tokens")
      ("bench_iters", po::value(&bench_iters)->default_value(5), "bench: timed iterations")
      ("bench_rank", po::value(&bench_rank)->default_value(64), "bench: LoRA rank of the training mode");
  po::variables_map vm;
  if (!parse_command_line("encode", desc, argc, argv, vm)) return 0;
  const at::ScalarType dtype = parse_dtype(dtype_s, "--dtype");
  const c10::Device device = parse_device(device_s, "--device");
  if (bench) return run_bench(bench_size, bench_batches, bench_tokens, bench_iters, bench_rank, dtype, device);
  for (const char* need : {"pretrained_model_name_or_path", "prompts", "output"})
    if (!vm.count(need)) throw Error(std::string("--") + need + " is required");
  limits::check_range("--max_sequence_length", max_len, 1, 512, " (T5's trained length)");
  limits::check_range("--batch_size", batch, 1, limits::kMaxBatch);
  check_output_file("--output", output, {{"--prompts", prompts_path}});
  if (!save_lora.empty()) check_output_file("--save_text_encoder_lora", save_lora, {{"--text_encoder_lora", lora_path}});
  check_input(!(tokenize_only && !lora_path.empty()), "--text_encoder_lora needs the encoders (drop --tokenize_only)");

  const std::vector<std::string> prompts = read_prompts_file(prompts_path);
  TextEncoderSetup s;
  s.snapshot_dir = model;
  s.tokenizers_only = tokenize_only;
  s.dtype = dtype;
  s.device = device;
  s.max_sequence_length = max_len;
  s.gradient_checkpointing = ckpt;
  TextEncoders enc = TextEncoders::load(s);
  if (!lora_path.empty()) {
    TextEncoderLoraFile f = load_text_encoder_lora_file(lora_path, &enc.clip()->config(), &enc.t5()->config(), lora_alpha);
    enc.set_lora(std::move(f.clip), std::move(f.t5));
    if (!save_lora.empty()) enc.save_lora_diffusers(save_lora);
  }
  check_input(save_lora.empty() || !lora_path.empty(), "--save_text_encoder_lora needs --text_encoder_lora");
  const TextEncoding ids = enc.tokenize(prompts);
  TensorMap out{{"clip_input_ids", ids.clip_input_ids}, {"t5_input_ids", ids.t5_input_ids}};
  if (!tokenize_only) {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> pooled, embeds;
    const int64_t n = static_cast<int64_t>(prompts.size());
    for (int64_t b = 0; b < n; b += batch) {
      const int64_t e = std::min(n, b + batch);
      TextEncoding r = enc.encode_ids(ids.clip_input_ids.slice(0, b, e), ids.t5_input_ids.slice(0, b, e));
      pooled.push_back(r.pooled_prompt_embeds.to(at::kCPU));
      embeds.push_back(r.prompt_embeds.to(at::kCPU));
    }
    const auto& cc = enc.clip()->config();
    const auto& tc = enc.t5()->config();
    out["pooled_prompt_embeds"] = n ? at::cat(pooled) : at::empty({0, cc.hidden_size}, at::TensorOptions().dtype(dtype));
    out["prompt_embeds"] = n ? at::cat(embeds) : at::empty({0, max_len, tc.d_model}, at::TensorOptions().dtype(dtype));
  }
  safetensors::save(output, out, {{"source", model}, {"max_sequence_length", std::to_string(max_len)}});
  std::cout << output << "\n";
  return 0;
}

}  // namespace fluxtrain
