// The optional config files of a Hugging Face tokenizer folder (tokenizer_config.json,
// special_tokens_map.json): special token strings and model_max_length, when present.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace fluxtrain {

class TokenizerConfig {
 public:
  explicit TokenizerConfig(const std::string& dir);  // missing files are fine; bad JSON throws Error
  // A token given as "text" or {"content": "text", ...}; fallback when absent or null.
  std::string token(const std::string& name, const std::string& fallback) const;
  // An integer setting; fallback when absent, null or absurdly large (transformers writes 1e30).
  int64_t integer(const std::string& name, int64_t fallback) const;

 private:
  nlohmann::json merged_ = nlohmann::json::object();
};

}  // namespace fluxtrain
