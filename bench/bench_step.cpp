// fluxtrain bench: one EasyControl LoRA training step at given cond/noise/rank sizes, printed as
// one JSON line per configuration. The step is the trainer's: its weights provider comes from
// make_block_weights (train/setup.h), the model part is flow_loss_sum (train/train_step.h) and
// the update the trainer's optimizer (clipping + AdamW; in graph mode its capturable form).
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <cstdlib>
#include <ATen/DeviceAccelerator.h>
#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>

#include "core/device_info.h"
#include "bench/flops.h"
#include "bench/gpu_power.h"
#include "bench/profile_trace.h"
#include "bench/step_runner.h"
#include "cli/cli_common.h"
#include "cli/commands.h"
#include "core/error.h"
#include "model/flux_transformer.h"
#include "model/flux_weights.h"
#include "model/position_ids.h"
#include "model/blocks.h"
#include "model/model_options.h"
#include "model/recompute.h"
#include "dist/communicator.h"
#include "encoders/clip_text_model.h"
#include "encoders/t5_encoder.h"
#include "encoders/text_encoder_configs.h"
#include "encoders/text_encoder_lora.h"
#include "encoders/tiny_text_encoders.h"
#include "dist/process_group.h"
#include "dist/sharded_weights.h"
#include "dist/low_memory_options.h"
#include "train/memory_estimate.h"
#include "train/optimizer.h"
#include "train/setup.h"
#include "train/train_step.h"

namespace po = boost::program_options;

namespace fluxtrain {
namespace {

struct BenchCase {
  int64_t cond, noise, rank;
};

std::vector<BenchCase> parse_cases(const std::string& s) {
  std::vector<BenchCase> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    BenchCase c{};
    if (std::sscanf(item.c_str(), "%ld/%ld/%ld", &c.cond, &c.noise, &c.rank) != 3 || c.cond % 16 || c.noise % 16 ||
        c.rank <= 0)
      throw Error("--configs: '" + item + "' is not cond/noise/rank with sizes multiples of 16");
    out.push_back(c);
  }
  return out;
}

void sync(const c10::Device& d) {
  if (!d.is_cpu()) at::accelerator::synchronizeDevice(d.index() < 0 ? 0 : d.index());
}

}  // namespace

int cmd_bench(int argc, char** argv) {
  std::string size, cases_s, ckpt_s, device_s, dtype_s, ckpt_attn;
  int warmup = 3, iters = 7, txt_len = 512, batch = 1;
  std::string graph_s;
  bool sharded = false, compare_resident = false;
  std::string te_mode = "none";
  std::string lora_mode = "easycontrol";
  int64_t te_rank = 32;
  uint64_t seed = 0;
  std::string blocks_s, profile_path;
  std::string lora_targets_s = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,proj_mlp,proj_out";
  po::options_description desc("bench options");
  desc.add_options()
      ("size", po::value(&size)->default_value("flux-dev"), "model size (tiny, flux-dev, flux-schnell)")
      ("configs", po::value(&cases_s)->default_value("192/384/16,256/512/32,384/768/64,512/1024/128"),
       "comma-separated cond_size/noise_size/rank")
      ("gradient_checkpointing", po::value(&ckpt_s)->default_value("both"), "off, on or both")
      ("checkpoint_attention", po::value(&ckpt_attn)->default_value("auto"),
       "auto, on or off: checkpointed blocks keep their attention results (train's flag; auto: on unless the "
       "low-memory options are used)")
      ("device", po::value(&device_s)->default_value("cuda"), "cpu or cuda[:N]")
      ("dtype", po::value(&dtype_s)->default_value("bf16"), "weight/activation dtype")
      ("txt_len", po::value(&txt_len)->default_value(512), "text tokens")
      ("batch", po::value(&batch)->default_value(1), "batch size")
      ("warmup", po::value(&warmup)->default_value(3), "untimed steps")
      ("iters", po::value(&iters)->default_value(7), "timed steps (median reported)")
      ("seed", po::value(&seed)->default_value(0), "seed")
      ("cuda_graph", po::value(&graph_s)->default_value("both"), "off, on or both: replay the step as a CUDA graph")
      ("sharded", po::bool_switch(&sharded), "FSDP-style sharded frozen weights over the MPI ranks "
       "(run under mpirun; implies --cuda_graph off)")
      ("text_encoder_mode", po::value(&te_mode)->default_value("none"),
       "none (cached embeddings), one_only (CLIP-L with a LoRA in the step, T5 states cached) or both "
       "(CLIP-L and T5-XXL with LoRAs in the step): the trainer's three modes, encoders at real size "
       "(tiny with --size tiny), random weights, on the step's device; eager only")
      ("text_encoder_rank", po::value(&te_rank)->default_value(32), "LoRA rank of the text encoders")
      ("lora_mode", po::value(&lora_mode)->default_value("easycontrol"),
       "easycontrol (one condition, its LoRA on the condition tokens) or standard (no condition; LoRA on every "
       "token: q, k, v, proj of both streams, linear1 and linear2 of the single blocks, what kohya- and "
       "diffusers-style trainers train); with standard the configs' cond_size is ignored")
      ("lora_targets", po::value(&lora_targets_s)->default_value(lora_targets_s),
       "with --lora_mode standard: the adapted linears (diffusers names), or 'default' for train's default "
       "(to_q,to_k,to_v,to_out.0, what diffusers' FLUX LoRA script trains)")
      ("blocks", po::value(&blocks_s),
       "D/S: only D double and S single blocks of the size's dimensions (quick reproductions; FLOPs follow)")
      ("profile", po::value(&profile_path),
       "after timing, run one more eager step under LibTorch's profiler (Kineto) and write its Chrome trace "
       "to PATH_<cond>_<noise>_<rank>_<ckpt>.json (bench/kernel_classes.py sums it by kernel class)")
      ("compare_resident", po::bool_switch(&compare_resident),
       "with --sharded: also keep the weights resident and time both paths alternately, step by step "
       "(same process, same inputs), reporting the sharded overhead");
  dist::LowMemoryOptions low_memory;
  dist::add_low_memory_options(desc, low_memory);
  po::variables_map vm;
  if (!parse_command_line("bench", desc, argc, argv, vm)) return 0;
  low_memory.validate();
  const bool low = low_memory.fp8() || low_memory.streams();
  if (low && sharded) throw Error("bench: the low-memory options are measured without --sharded");
  if (ckpt_s != "off" && ckpt_s != "on" && ckpt_s != "both") throw Error("--gradient_checkpointing must be off, on or both");
  if (te_mode != "none" && te_mode != "one_only" && te_mode != "both")
    throw Error("--text_encoder_mode must be none, one_only or both, got '" + te_mode + "'");
  if (lora_mode != "easycontrol" && lora_mode != "standard")
    throw Error("--lora_mode must be easycontrol or standard, got '" + lora_mode + "'");
  const bool standard = lora_mode == "standard";
  // What checkpointed blocks keep (model/recompute.h), resolved as train resolves it.
  const bool keep_attention = checkpoint_attention_enabled(ckpt_attn, low);
  set_checkpoint_attention(keep_attention);
  std::vector<std::string> lora_targets;  // empty: LoraSet's default (train's)
  if (lora_targets_s != "default") {
    std::stringstream ts(lora_targets_s);
    for (std::string t; std::getline(ts, t, ',');)
      if (!t.empty()) lora_targets.push_back(t);
  }
  if (te_rank <= 0 || te_rank > 4096) throw Error("--text_encoder_rank must be in [1, 4096]");
  if (te_mode != "none" && sharded) throw Error("bench: --text_encoder_mode is measured without --sharded");
  // The encoders' forward and backward are part of the step and not captured (as in train).
  if (te_mode != "none") graph_s = "off";
  c10::Device dev = parse_device(device_s, "--device");
  dist::ProcessGroup* pg = nullptr;
  if (sharded) {
    pg = &dist::ProcessGroup::init();
    if (dev.is_cuda()) dev = pg->select_cuda_device();
    graph_s = "off";  // the provider's host-side slot logic cannot be captured
  }
  const bool print = !pg || pg->rank() == 0;
  configure_attention_backends();
  const at::ScalarType dtype = parse_dtype(dtype_s, "--dtype");
  FluxConfig cfg = FluxConfig::preset(size);
  if (vm.count("blocks")) {
    int64_t d = -1, ss = -1;
    if (std::sscanf(blocks_s.c_str(), "%ld/%ld", &d, &ss) != 2 || d < 0 || ss < 0 || d + ss == 0 || d > cfg.depth ||
        ss > cfg.depth_single)
      throw Error("--blocks: '" + blocks_s + "' is not D/S with 0 <= D <= " + std::to_string(cfg.depth) +
                  " and 0 <= S <= " + std::to_string(cfg.depth_single) + ", not both 0");
    cfg.depth = d;
    cfg.depth_single = ss;
  }
  const auto cases = parse_cases(cases_s);
  const auto opts = at::TensorOptions().device(dev).dtype(dtype);

  // Random frozen weights made directly on the device (no 24 GB host round trip), handed to the
  // trainer's provider choice.
  RuntimeRequest rq;
  rq.device = dev.str();
  rq.dtype = dtype;
  rq.distributed = sharded;
  rq.streamed_weights = low_memory.streams();
  if (pg) {
    rq.rank = pg->rank();
    rq.world_size = pg->world_size();
    rq.cuda_device = dev.is_cuda() ? dev.index() : -1;
  }
  Runtime rt = make_runtime(rq);
  std::unique_ptr<BlockWeights> resident_ptr, low_ptr;
  nlohmann::json low_json;
  if (low) {
    // fp8 / streamed: random weights made on the host, then stacked by make_block_weights the
    // way `train` stacks them; nothing of the full bf16 model stays on the device or the host.
    WeightsPlan plan;
    plan.low_memory = low_memory;
    if (!low_memory.max_gpu_memory.empty()) {
      const auto first = parse_cases(cases_s).at(0);
      MemoryEstimateInput mi;
      mi.model = cfg;
      mi.cond_size = standard ? 16 : first.cond;  // standard: no condition (the size is not used)
      mi.easycontrol = !standard;
      mi.lora_targets = lora_targets;
      mi.num_conditions = standard ? 0 : 1;
      mi.noise_size = first.noise;
      mi.lora_rank = first.rank;
      mi.batch = batch;
      mi.txt_len = txt_len;
      mi.gradient_checkpointing = ckpt_s == "on";
      mi.checkpoint_attention = keep_attention;
      mi.compute_bytes = static_cast<int64_t>(c10::elementSize(dtype));
      mi.low_memory = low_memory;
      mi.train_clip = te_mode != "none";  // the encoders of the mode share the budget, as in train
      mi.train_t5 = te_mode == "both";
      mi.text_encoder_rank = te_rank;
      plan.non_weight_bytes = estimate_non_weight_bytes(mi);
    }
    // Drawn a block at a time as the stack reads it: the host never holds the whole bf16 model,
    // so peak RSS is what the run holds (issue 14's host-memory bound), as with `train`, which
    // reads blocks from the file's mapping one at a time.
    WeightSource ws;
    ws.globals = init_random_global_weights(cfg, seed, dtype);
    ws.num_blocks = static_cast<int>(cfg.depth + cfg.depth_single);
    ws.depth = cfg.depth;
    ws.depth_single = cfg.depth_single;
    ws.block = [cfg, seed, dtype](int i) { return init_random_block_weights(cfg, seed, i, dtype); };
    ws.block_shapes = [cfg](int i) { return flux_block_shapes(cfg, i); };
    std::string described;
    low_ptr = make_block_weights(rt, ws, plan, &described);
    low_json = {{"plan", described}, {"base_precision", low_memory.base_precision},
                {"fp8_matmul", low_memory.fp8_matmul}, {"fp8_keep_transposed", low_memory.fp8_keep_transposed},
                {"blocks_to_swap", low_memory.blocks_to_swap}, {"max_gpu_memory", low_memory.max_gpu_memory},
                {"offload_prefetch", low_memory.offload_prefetch}};
  } else {
    resident_ptr = make_block_weights(
        rt, weight_source(init_random_weights(cfg, seed, dtype, dev), cfg.depth, cfg.depth_single), {});
  }
  // Null with the low-memory options (no resident copy, no --sharded comparison).
  ResidentBlockWeights* resident = static_cast<ResidentBlockWeights*>(resident_ptr.get());
  BlockWeights* weights_ptr = low ? low_ptr.get() : resident_ptr.get();
  std::unique_ptr<BlockWeights> shards_ptr;
  dist::ShardedBlockWeights* shards = nullptr;
  nlohmann::json weight_bytes, gather_json;
  if (sharded) {
    WeightsPlan plan;
    plan.sharded = true;
    WeightSource src;
    src.globals = resident->globals();
    src.num_blocks = resident->num_blocks();
    src.depth = cfg.depth;
    src.depth_single = cfg.depth_single;
    src.block = [resident](int i) { return resident->acquire(i); };
    shards_ptr = make_block_weights(rt, src, plan);
    shards = static_cast<dist::ShardedBlockWeights*>(shards_ptr.get());
    if (!compare_resident)
      for (auto& b : resident->blocks()) b.clear();  // only the shards stay resident
    weights_ptr = shards;
    // All blocks gathered once in forward order with nothing else on the GPU: the bare cost of
    // unsharding (on one rank: the local copies; on several: the transfers too).
    auto gather_pass = [&] {
      for (int b = 0; b < shards->num_blocks(); ++b) {
        shards->acquire(b);
        shards->release(b);
      }
      shards->quiesce();
      sync(dev);
    };
    gather_pass();
    std::vector<double> pass_ms;
    for (int i = 0; i < 5; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      gather_pass();
      pass_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(pass_ms.begin(), pass_ms.end());
    const auto& st = shards->stats();
    gather_json = {{"pass_ms", pass_ms[pass_ms.size() / 2]},
                   {"gathered_gb_per_s", st.full_block_bytes / (pass_ms[pass_ms.size() / 2] / 1000.0) / 1e9}};
    weight_bytes = {{"full_block_bytes", st.full_block_bytes}, {"shard_bytes", st.shard_bytes},
                    {"replicated_bytes", st.replicated_bytes}, {"gather_buffer_bytes", st.gather_buffer_bytes},
                    {"resident_frozen_bytes_per_rank", st.resident_bytes()},
                    {"mapping_granularity", st.granularity}};
  }
  // Text encoders of the mode, on the step's device in its dtype, with their LoRAs (float32
  // masters, as the trainer keeps them).
  std::unique_ptr<ClipTextModel> clip;
  std::unique_ptr<T5Encoder> t5;
  TextEncoderLora clip_lora, t5_lora;
  int64_t clip_vocab = 0, clip_len = 0;
  double encoders_gib = 0;
  if (te_mode != "none") {
    const bool tiny_te = size.rfind("tiny", 0) == 0;
    const ClipTextConfig cc = tiny_te ? ClipTextConfig::tiny(cfg.vec_in_dim) : ClipTextConfig::clip_l();
    clip = std::make_unique<ClipTextModel>(cc, random_clip_weights(cc, seed, dtype, dev), "random CLIP");
    clip->to(dtype, dev);
    clip_lora = TextEncoderLora::create(ClipTextModel::lora_targets(cc), te_rank, static_cast<double>(te_rank), seed);
    clip_lora.to(dev);
    clip_vocab = cc.vocab_size;
    clip_len = cc.max_position_embeddings;
    encoders_gib += static_cast<double>(clip->resident_bytes());
    if (te_mode == "both") {
      const T5EncoderConfig tc = tiny_te ? T5EncoderConfig::tiny(cfg.context_in_dim) : T5EncoderConfig::t5_xxl();
      if (low) {
        // Placed as `train` places it under the low-memory options (train/setup.h), its layers
        // drawn one at a time as the stack packs them (as train reads them from the file).
        t5 = std::make_unique<T5Encoder>(tc, random_t5_weights_meta_layers(tc, seed, dtype), "random T5");
        low_json["t5_plan"] = place_t5_low_memory(
            *t5, low_memory, dev, dtype, [tc, seed, dtype](int i) { return random_t5_layer_weights(tc, seed, i, dtype); });
      } else {
        t5 = std::make_unique<T5Encoder>(tc, random_t5_weights(tc, seed, dtype, dev), "random T5");
        t5->to(dtype, dev);
      }
      t5_lora = TextEncoderLora::create(T5Encoder::lora_targets(tc), te_rank, static_cast<double>(te_rank), seed + 1);
      t5_lora.to(dev);
      encoders_gib += static_cast<double>(t5->resident_bytes());
    }
    encoders_gib /= static_cast<double>(1ull << 30);
  }
  compare_resident = compare_resident && sharded;
  BlockWeights* current = weights_ptr;  // what the step runs on (alternates with --compare_resident)
  const std::string device_label = device_name(dev);

  std::vector<bool> graph_modes;
  if (graph_s != "on" || dev.is_cpu()) graph_modes.push_back(false);
  if (graph_s != "off" && !dev.is_cpu()) graph_modes.push_back(true);
  std::vector<bool> modes;
  if (ckpt_s != "on") modes.push_back(false);
  if (ckpt_s != "off") modes.push_back(true);
  for (const auto& bc : cases) {
    for (bool ckpt : modes) {
    for (bool graph : graph_modes) {
      try {
      LoraConfig lc;
      lc.ranks = {bc.rank};
      lc.alphas = {static_cast<double>(bc.rank)};
      if (standard) {
        lc.mode = LoraMode::Standard;
        lc.targets = lora_targets;
      }
      LoraSet lora = LoraSet::create(cfg, lc, seed);
      lora.to(at::TensorOptions().device(dev).dtype(at::kFloat));
      auto params = lora.parameters();
      std::vector<ParamGroup> groups{{"transformer", params}};
      if (clip) groups.push_back({"text_encoder", clip_lora.parameters()});
      if (t5) groups.push_back({"text_encoder_2", t5_lora.parameters()});
      std::unique_ptr<Optimizer> optimizer = make_adamw(groups, AdamWConfig{});
      const int64_t nh = bc.noise / 16, ch = standard ? 0 : bc.cond / 16;
      FluxInputs in;
      in.img = at::randn({batch, nh * nh, cfg.in_channels}, opts);
      in.img_ids = noise_position_ids(nh, nh).to(dev);
      in.txt = at::randn({batch, txt_len, cfg.context_in_dim}, opts);
      in.txt_ids = text_position_ids(txt_len).to(dev);
      in.y = at::randn({batch, cfg.vec_in_dim}, opts);
      in.timesteps = at::rand({batch}, opts.dtype(at::kFloat));
      in.guidance = at::ones({batch}, opts.dtype(at::kFloat));
      if (!standard) {
        in.cond = {at::randn({batch, ch * ch, cfg.in_channels}, opts)};
        in.cond_ids = {subject_position_ids(ch, ch).to(dev)};
      }
      at::Tensor target = at::randn({batch, nh * nh, cfg.out_channels}, opts.dtype(at::kFloat));

      const at::Tensor clip_ids =
          clip ? at::randint(clip_vocab, {batch, clip_len}, at::TensorOptions().dtype(at::kLong)).to(dev) : at::Tensor();
      const at::Tensor t5_ids =
          t5 ? at::randint(32100, {batch, txt_len}, at::TensorOptions().dtype(at::kLong)).to(dev) : at::Tensor();
      const at::Tensor lr_t = at::full({}, 1e-4, at::TensorOptions().device(dev).dtype(at::kFloat));
      const at::Tensor no_skip = at::zeros({}, at::TensorOptions().device(dev).dtype(at::kFloat));
      auto step = [&] {
        // The text-encoder modes encode in the step, through their LoRAs (the trainer's conditioning).
        if (clip) in.y = clip->forward(clip_ids, &clip_lora, ckpt).pooled.to(dtype);
        if (t5) in.txt = t5->forward(t5_ids, &t5_lora, ckpt).to(dtype);
        flow_loss_sum(cfg, *current, &lora, in, target, ckpt).backward();
        // Eager: the trainer's update (its norm decides a skip on the host), then drop grads
        // (the next backward creates them). Graph: the capturable update keeps the captured
        // buffers, which backward overwrites on every replay.
        if (graph) {
          optimizer->step_on_device(lr_t, 1.0, no_skip);
        } else {
          optimizer->step(1e-4, 1.0);
          for (auto& g : groups)
            for (auto& p : g.params) p.mutable_grad().reset();
        }
      };
      // Peak memory is measured from here: it covers warm-up and, in graph mode, the capture,
      // whose allocations stay reserved for the graph's private pool.
      sync(dev);
      if (!dev.is_cpu()) at::accelerator::resetPeakStats(dev.index() < 0 ? 0 : dev.index());
      std::unique_ptr<StepRunner> runner =
          graph ? make_cuda_graph_runner(step, warmup) : make_eager_runner(step);
      for (int i = 0; i < warmup; ++i) {
        runner->run();
        if (compare_resident) {
          current = resident;
          runner->run();
          current = weights_ptr;
        }
      }
      sync(dev);
      // The clocks the timed steps ran at (NVML, sampled every 20 ms; CUDA only).
      std::unique_ptr<PowerSampler> power;
      if (dev.is_cuda()) power = std::make_unique<PowerSampler>(dev.index() < 0 ? 0 : dev.index());
      if (power) power->start();
      std::vector<double> ms, host_ms, resident_ms;
      for (int i = 0; i < iters; ++i) {
        if (compare_resident) {
          // A/B in alternation: host and clock drift hit both paths alike.
          current = resident;
          sync(dev);
          auto r0 = std::chrono::steady_clock::now();
          runner->run();
          sync(dev);
          resident_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - r0).count());
          current = weights_ptr;
        }
        sync(dev);
        auto t0 = std::chrono::steady_clock::now();
        runner->run();
        // Time to issue the step from the host: close to ms_per_step means launch-bound.
        host_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        sync(dev);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      const std::optional<PowerSummary> power_summary = power ? power->stop() : std::nullopt;
      std::sort(ms.begin(), ms.end());
      std::sort(host_ms.begin(), host_ms.end());
      const double med = ms[ms.size() / 2];
      double peak_gib = 0;
      if (!dev.is_cpu())
        peak_gib = static_cast<double>(at::accelerator::getDeviceStats(dev.index() < 0 ? 0 : dev.index())
                                           .allocated_bytes[0].peak) / (1ull << 30);
      StepShape shape{batch, txt_len, nh * nh, standard ? std::vector<int64_t>{} : std::vector<int64_t>{ch * ch}, bc.rank};
      shape.standard = standard;
      const double flops = lora_step_flops(cfg, shape);
      const int64_t tokens = batch * (txt_len + nh * nh + ch * ch);
      nlohmann::json j = {{"name", "lora_step"},
                          {"device", device_label},
                          {"world_size", pg ? pg->world_size() : 1},
                          {"sharded", sharded},
                          {"config", {{"model", size}, {"cond_size", bc.cond}, {"noise_size", bc.noise},
                                      {"rank", bc.rank}, {"batch", batch}, {"txt_len", txt_len},
                                      {"gradient_checkpointing", ckpt},
                                      {"checkpoint_attention", ckpt && keep_attention}, {"dtype", dtype_s},
                                      {"text_encoder_mode", te_mode}, {"lora_mode", lora_mode},
                                      {"lora_targets", standard ? lora_targets_s : std::string()},
                                      {"execution", runner->mode()}}},
                          {"ms_per_step", med},
                          {"ms_min", ms.front()},
                          {"host_ms_per_step", host_ms[host_ms.size() / 2]},
                          {"ms_max", ms.back()},
                          {"tokens_per_s", tokens / (med / 1000.0)},
                          {"model_tflops", flops / (med / 1000.0) / 1e12},
                          {"step_tflop", flops / 1e12},
                          {"peak_gib", peak_gib}};
      {
        // The process's peak resident host memory so far (weights held on the host included;
        // issue 14's bound is those plus 4 GiB): getrusage's high-water mark, as train reports it.
        rusage ru{};
        if (getrusage(RUSAGE_SELF, &ru) == 0) j["peak_host_rss_gib"] = static_cast<double>(ru.ru_maxrss) / (1 << 20);
      }
      if (power_summary) {
        const PowerSummary& p = *power_summary;
        j["gpu_power"] = {{"samples", p.samples},
                          {"sm_mhz_median", p.sm_mhz_median},
                          {"sm_mhz_min", p.sm_mhz_min},
                          {"sm_mhz_max_supported", p.sm_mhz_max_supported},
                          {"power_w_median", p.power_w_median},
                          {"power_limit_w", p.power_limit_w},
                          {"power_capped_fraction", p.power_capped_fraction},
                          {"slowdown_fraction", p.slowdown_fraction}};
      }
      if (low) j["low_memory"] = low_json;
      if (clip) {
        // Everything the mode needs is on this device: peak_gib includes the encoders.
        j["encoders_gib"] = encoders_gib;
        j["text_encoder_rank"] = te_rank;
        j["t5"] = t5 ? "trained" : "cached states";
      }
      if (sharded) {
        // The shards live in mapped memory outside the caching allocator: add them for the
        // process's real peak.
        j["peak_gib_with_shards"] = peak_gib + static_cast<double>(shards->stats().resident_bytes() -
                                                                   shards->stats().replicated_bytes) / (1ull << 30);
        j["weights"] = weight_bytes;
        j["gather"] = gather_json;
      }
      if (compare_resident) {
        std::sort(resident_ms.begin(), resident_ms.end());
        const double rmed = resident_ms[resident_ms.size() / 2];
        j["resident_ms_per_step"] = rmed;
        j["sharded_overhead_pct"] = 100.0 * (med - rmed) / rmed;
      }
      if (print) std::cout << j.dump() << std::endl;
      if (!profile_path.empty() && !graph && print) {
        // One more step, eager, under the profiler: kernel names and durations per step.
        const std::string trace = profile_path + "_" + std::to_string(bc.cond) + "_" + std::to_string(bc.noise) +
                                  "_" + std::to_string(bc.rank) + (ckpt ? "_ckpt" : "") + ".json";
        profile_to_chrome_trace([&] { runner->run(); }, [&] { sync(dev); }, dev.is_cuda(), trace);
        std::cerr << "bench: profile trace " << trace << "\n";
      }
      } catch (const c10::Error& e) {
        // Out of memory, or a failed graph capture: report it and go on with the next case.
        std::string what = e.what_without_backtrace();
        nlohmann::json j = {{"name", "lora_step"}, {"device", device_label},
                            {"config", {{"cond_size", bc.cond}, {"noise_size", bc.noise}, {"rank", bc.rank},
                                        {"gradient_checkpointing", ckpt}, {"cuda_graph", graph}}},
                            {"error", what.substr(0, what.find('\n'))}};
        std::cout << j.dump() << std::endl;
      }
      if (!dev.is_cpu()) at::accelerator::emptyCache();
    }
    }
  }
  if (shards) shards->quiesce();
  shards_ptr.reset();
  rt = Runtime();
  if (pg) dist::ProcessGroup::finalize();
  return 0;
}

}  // namespace fluxtrain
