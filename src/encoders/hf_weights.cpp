#include "encoders/hf_weights.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/shape_str.h"
#include "core/fs.h"
#include "core/safetensors.h"

namespace fluxtrain {
namespace {

char shard_name_buf[64];
std::string shard_name(size_t i, size_t n) {
  std::snprintf(shard_name_buf, sizeof shard_name_buf, "model-%05zu-of-%05zu.safetensors", i, n);
  return shard_name_buf;
}

}  // namespace

nlohmann::json read_hf_config(const std::string& dir) {
  const std::string path = path_join(dir, "config.json");
  if (!path_exists(path)) throw Error(path + ": missing (a Hugging Face model folder needs config.json)");
  try {
    nlohmann::json j = nlohmann::json::parse(read_text_file(path));
    if (!j.is_object()) throw Error(path + ": expected a JSON object");
    return j;
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": not valid JSON (" + std::string(e.what()) + ")");
  }
}

TensorMap load_hf_weights(const std::string& dir) {
  const std::string single = path_join(dir, "model.safetensors");
  const std::string index_path = path_join(dir, "model.safetensors.index.json");
  if (path_exists(single)) return safetensors::load(single);
  if (!path_exists(index_path))
    throw Error(dir + ": has neither model.safetensors nor model.safetensors.index.json");
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(read_text_file(index_path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(index_path + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    throw Error(index_path + ": expected {\"weight_map\": {tensor: shard file}}");
  std::map<std::string, std::vector<std::string>> by_shard;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    if (!it.value().is_string()) throw Error(index_path + ": shard of '" + it.key() + "' is not a file name");
    by_shard[it.value().get<std::string>()].push_back(it.key());
  }
  TensorMap out;
  for (const auto& [shard, names] : by_shard) {
    const std::string path = path_join(dir, shard);
    if (!path_exists(path)) throw Error(index_path + ": lists shard '" + shard + "', which is missing");
    safetensors::File f(path);
    for (const auto& n : names) {
      if (!f.contains(n)) throw Error(path + ": has no tensor '" + n + "' although " + index_path + " says so");
      out[n] = f.load(n);
    }
  }
  return out;
}

void save_hf_weights(const std::string& dir, const TensorMap& w, uint64_t max_shard_bytes) {
  make_directories(dir);
  uint64_t total = 0;
  for (const auto& kv : w) total += kv.second.nbytes();
  if (total <= max_shard_bytes) {
    safetensors::save(path_join(dir, "model.safetensors"), w, {{"format", "pt"}});
    return;
  }
  // Greedy shards in name order, as save_pretrained does: a new shard when the next tensor overflows.
  std::vector<TensorMap> shards(1);
  uint64_t cur = 0;
  for (const auto& kv : w) {
    const uint64_t b = kv.second.nbytes();
    if (cur > 0 && cur + b > max_shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back()[kv.first] = kv.second;
    cur += b;
  }
  nlohmann::json map = nlohmann::json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string name = shard_name(i + 1, shards.size());
    safetensors::save(path_join(dir, name), shards[i], {{"format", "pt"}});
    for (const auto& kv : shards[i]) map[kv.first] = name;
  }
  nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", map}};
  write_text_file_atomic(path_join(dir, "model.safetensors.index.json"), index.dump(2));
}

void check_weights(const TensorMap& w, const std::map<std::string, std::vector<int64_t>>& expected,
                   const std::string& where, const std::set<std::string>& ignored) {
  for (const auto& [name, shape] : expected) {
    auto it = w.find(name);
    if (it == w.end()) throw Error(where + ": missing tensor '" + name + "' (expected shape " + shape_str(shape) + ")");
    if (it->second.sizes() != at::IntArrayRef(shape))
      throw Error(where + ": tensor '" + name + "' has shape " + shape_str(it->second.sizes()) + ", expected " +
                  shape_str(shape) + " (config.json and weights disagree?)");
  }
  for (const auto& kv : w)
    if (!expected.count(kv.first) && !ignored.count(kv.first))
      throw Error(where + ": unexpected tensor '" + kv.first + "' (not part of this model)");
}

}  // namespace fluxtrain
