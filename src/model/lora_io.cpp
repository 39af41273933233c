#include "model/lora_io.h"

#include <regex>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/safetensors.h"

namespace fluxtrain {

void save_lora_file(const std::string& path, const LoraSet& lora) {
  const LoraConfig& c = lora.config();
  nlohmann::json meta = {{"mode", c.mode == LoraMode::EasyControl ? "easycontrol" : "standard"},
                         {"lora_num", c.lora_num},
                         {"ranks", c.ranks},
                         {"network_alphas", c.alphas},
                         {"targets", c.targets},
                         {"blocks", c.blocks}};
  TensorMap t;
  for (const auto& kv : lora.state()) t.emplace(kv.first, kv.second.to(at::kFloat));
  safetensors::save(path, t, {{"format", "pt"}, {"fluxtrain_lora", meta.dump()}});
}

LoraSet load_lora_file(const std::string& path, const FluxConfig& cfg, const std::vector<double>& alphas) {
  safetensors::File f(path);
  LoraConfig lc;
  auto md = f.metadata().find("fluxtrain_lora");
  if (md != f.metadata().end()) {
    try {
      auto j = nlohmann::json::parse(md->second);
      lc.mode = j.at("mode") == "standard" ? LoraMode::Standard : LoraMode::EasyControl;
      lc.lora_num = j.at("lora_num").get<int>();
      lc.ranks = j.at("ranks").get<std::vector<int64_t>>();
      lc.alphas = j.at("network_alphas").get<std::vector<double>>();
      lc.targets = j.value("targets", std::vector<std::string>{});
      lc.blocks = j.value("blocks", std::vector<int>{});
    } catch (const std::exception& e) {
      throw Error(path + ": bad fluxtrain_lora metadata (" + std::string(e.what()) + ")");
    }
  } else {
    // EasyControl's own file: lora_num and ranks from the q_loras down weights of block 0.
    static const std::regex re(R"(^transformer_blocks\.0\.attn\.processor\.q_loras\.(\d+)\.down\.weight$)");
    std::map<int, int64_t> rank_of;
    for (const auto& kv : f.entries()) {
      std::smatch m;
      if (std::regex_match(kv.first, m, re)) rank_of[std::stoi(m[1])] = kv.second.shape.at(0);
    }
    if (rank_of.empty())
      throw Error(path + ": not a LoRA file fluxtrain knows (no fluxtrain_lora metadata and no "
                         "transformer_blocks.0.attn.processor.q_loras.N.down.weight keys)");
    lc.mode = LoraMode::EasyControl;
    lc.lora_num = static_cast<int>(rank_of.size());
    lc.ranks.clear();
    for (const auto& kv : rank_of) lc.ranks.push_back(kv.second);
    if (!alphas.empty()) {
      if (alphas.size() != lc.ranks.size())
        throw Error(path + ": has " + std::to_string(lc.ranks.size()) + " conditions but --network_alphas gives " +
                    std::to_string(alphas.size()) + " values");
      lc.alphas = alphas;
    } else {
      lc.alphas.assign(lc.ranks.begin(), lc.ranks.end());
    }
  }
  LoraSet set = LoraSet::create(cfg, lc, 0);
  set.load_state(f.load_all(), path);
  return set;
}

}  // namespace fluxtrain
