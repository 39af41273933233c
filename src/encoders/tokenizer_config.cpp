#include "encoders/tokenizer_config.h"

#include "core/error.h"
#include "core/fs.h"

namespace fluxtrain {

TokenizerConfig::TokenizerConfig(const std::string& dir) {
  // special_tokens_map.json first: tokenizer_config.json, when both say something, wins.
  for (const char* name : {"special_tokens_map.json", "tokenizer_config.json"}) {
    const std::string path = path_join(dir, name);
    if (!path_exists(path)) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_text_file(path));
    } catch (const nlohmann::json::exception& e) {
      throw Error(path + ": not valid JSON (" + std::string(e.what()) + ")");
    }
    if (!j.is_object()) throw Error(path + ": expected a JSON object");
    for (auto it = j.begin(); it != j.end(); ++it) merged_[it.key()] = it.value();
  }
}

std::string TokenizerConfig::token(const std::string& name, const std::string& fallback) const {
  auto it = merged_.find(name);
  if (it == merged_.end() || it->is_null()) return fallback;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  throw Error("tokenizer config: '" + name + "' must be a string or {\"content\": string}");
}

int64_t TokenizerConfig::integer(const std::string& name, int64_t fallback) const {
  auto it = merged_.find(name);
  if (it == merged_.end() || !it->is_number()) return fallback;
  const double v = it->get<double>();
  if (v <= 0 || v > 1e9) return fallback;
  return static_cast<int64_t>(v);
}

}  // namespace fluxtrain
