#include "train/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sys/stat.h>
#include <regex>
#include <sstream>

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/hdf5_io.h"

namespace fluxtrain {
namespace {

constexpr const char* kFormat = "fluxtrain-checkpoint";
constexpr int64_t kVersion = 1;

std::string describe(const FluxConfig& c) {
  std::ostringstream ss;
  ss << "hidden " << c.hidden_size << ", " << c.num_heads << " heads, " << c.depth << "+" << c.depth_single
     << " blocks, in_channels " << c.in_channels << ", context " << c.context_in_dim << ", pooled " << c.vec_in_dim
     << ", guidance " << (c.guidance_embed ? "yes" : "no");
  return ss.str();
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream ss;
  ss << s;
  return ss.str();
}

}  // namespace

nlohmann::json flux_config_json(const FluxConfig& c) { return c.to_diffusers_json(); }

std::string checkpoint_path(const std::string& output_dir, int64_t step) {
  return path_join(output_dir, "checkpoint-" + std::to_string(step) + ".h5");
}

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& output_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  // Final names only: "checkpoint-500.h5.tmp.1234" (an interrupted write) never matches.
  static const std::regex re(R"(^checkpoint-(\d+)\.h5$)");
  for (const auto& name : list_directory(output_dir)) {  // POSIX helpers: see core/fs.h
    std::smatch m;
    const std::string path = path_join(output_dir, name);
    struct stat st;
    if (std::regex_match(name, m, re) && ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode))
      out.emplace_back(std::stoll(m[1]), path);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string latest_checkpoint(const std::string& output_dir) {
  auto all = list_checkpoints(output_dir);
  return all.empty() ? "" : all.back().second;
}

void save_checkpoint(const std::string& path, const Checkpoint& ck) {
  const std::string tmp = temp_path_for(path);
  try {
    h5::File f = h5::File::create(tmp);
    f.set_attr("format", std::string(kFormat));
    f.set_attr("version", kVersion);
    f.set_attr("step", ck.state.step);
    f.set_attr("micro_batch", ck.state.micro_batch);
    f.set_attr("nonfinite_in_a_row", ck.state.nonfinite_in_a_row);
    f.set_attr("nonfinite_total", ck.state.nonfinite_total);
    f.set_attr("optimizer_steps", ck.state.optimizer_steps);
    f.set_attr("seed", static_cast<int64_t>(ck.state.seed));
    f.set_attr("lr", ck.state.lr);
    f.set_attr("global_batch", ck.state.global_batch);
    f.write_strings("config_json", {ck.config.dump()});
    f.write_strings("model_json", {flux_config_json(ck.model).dump()});
    f.write_strings("scheduler_json", {ck.scheduler.dump()});
    // Weights and moments are small (LoRA only) and already random-looking: no compression.
    h5::WriteOptions raw;
    raw.deflate = 0;
    {
      h5::Location g = f.create_group("lora");
      for (const auto& kv : ck.lora) g.write_tensor(kv.first, kv.second, raw);
    }
    {
      h5::Location g = f.create_group("optimizer");
      for (const auto& kv : ck.optimizer) g.write_tensor(kv.first, kv.second, raw);
    }
    f.flush();
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  if (const char* abort_at = std::getenv("FLUXTRAIN_TEST_ABORT_BEFORE_RENAME")) {
    if (std::to_string(ck.state.step) == abort_at) {
      std::fflush(nullptr);
      std::_Exit(134);  // like a kill: the temp file stays, nothing is renamed or cleaned up
    }
  }
  commit_temp(tmp, path);
}

Checkpoint load_checkpoint(const std::string& path) {
  Checkpoint ck;
  h5::File f = h5::File::open(path);
  try {
    if (!f.has_attr("format") || f.attr_string("format") != kFormat)
      throw Error(path + ": not a fluxtrain checkpoint (see docs/checkpoint.md)");
    const int64_t version = f.attr_int("version");
    if (version != kVersion) throw Error(path + ": checkpoint version " + std::to_string(version) + " is not supported");
    ck.state.step = f.attr_int("step");
    ck.state.micro_batch = f.attr_int("micro_batch");
    ck.state.nonfinite_in_a_row = f.attr_int("nonfinite_in_a_row");
    ck.state.nonfinite_total = f.attr_int("nonfinite_total");
    ck.state.optimizer_steps = f.attr_int("optimizer_steps");
    ck.state.seed = static_cast<uint64_t>(f.attr_int("seed"));
    ck.state.lr = f.attr_double("lr");
    // Absent in checkpoints written before distributed training: 0 = unknown (one rank).
    ck.state.global_batch = f.has_attr("global_batch") ? f.attr_int("global_batch") : 0;
    auto one = [&](const std::string& name) {
      auto v = f.read_strings(name);
      if (v.size() != 1) throw Error(path + ": /" + name + " must hold one string");
      try {
        return nlohmann::json::parse(v[0]);
      } catch (const std::exception&) {
        throw Error(path + ": /" + name + " is not valid JSON");
      }
    };
    ck.config = one("config_json");
    ck.scheduler = one("scheduler_json");
    ck.model = FluxConfig::from_diffusers_json(one("model_json"), path);
    h5::Location lg = f.group("lora");
    for (const auto& name : lg.children()) ck.lora.emplace(name, lg.read_tensor(name));
    h5::Location og = f.group("optimizer");
    for (const auto& name : og.children()) ck.optimizer.emplace(name, og.read_tensor(name));
  } catch (const Error& e) {
    const std::string m = e.what();
    if (m.rfind(path, 0) == 0) throw;
    throw Error(path + ": " + m);
  }
  return ck;
}

std::vector<std::string> prune_checkpoints(const std::string& output_dir, int64_t limit) {
  std::vector<std::string> removed;
  if (limit <= 0) return removed;
  auto all = list_checkpoints(output_dir);
  while (static_cast<int64_t>(all.size()) > limit) {
    remove_file(all.front().second);
    removed.push_back(all.front().second);
    all.erase(all.begin());
  }
  return removed;
}

void check_checkpoint_matches(const Checkpoint& ck, const std::string& path, const FluxConfig& model,
                              const LoraSet& lora) {
  if (!(ck.model == model))
    throw Error(path + ": checkpoint is for another model size (" + describe(ck.model) + "); this model has " +
                describe(model));
  const TensorMap mine = lora.state();
  for (const auto& kv : mine) {
    auto it = ck.lora.find(kv.first);
    if (it == ck.lora.end())
      throw Error(path + ": checkpoint has no LoRA weight " + kv.first + " (different --lora_mode, --lora_num or targets?)");
    if (it->second.sizes() != kv.second.sizes())
      throw Error(path + ": LoRA weight " + kv.first + " is " + shape_str(it->second.sizes()) + " in the checkpoint, " +
                  shape_str(kv.second.sizes()) + " in this run (different --ranks?)");
  }
  for (const auto& kv : ck.lora)
    if (!mine.count(kv.first))
      throw Error(path + ": checkpoint has LoRA weight " + kv.first + " that this run does not (different --lora_mode, "
                  "--lora_num or targets?)");
}

}  // namespace fluxtrain
