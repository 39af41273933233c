#include "encoders/tiny_text_encoders.h"

#include <ATen/ATen.h>

#include <cstdlib>

#include "core/error.h"
#include "core/fs.h"
#include "core/rng.h"
#include "encoders/clip_text_model.h"
#include "encoders/hf_weights.h"
#include "encoders/t5_encoder.h"

#ifndef FLUXTRAIN_TOKENIZER_DATA_DIR
#define FLUXTRAIN_TOKENIZER_DATA_DIR ""
#endif

namespace fluxtrain {
namespace {

// Norm weights 1, biases 0, embeddings and projections normal with the given std.
TensorMap random_from_shapes(const std::map<std::string, std::vector<int64_t>>& shapes, uint64_t seed,
                             at::ScalarType dtype, double embed_std, double linear_std, at::Device device) {
  at::Generator gen = cpu_generator(seed);
  TensorMap w;
  if (!device.is_cpu()) {
    for (const auto& [name, shape] : shapes) {
      const at::TensorOptions o = at::TensorOptions().dtype(dtype).device(device);
      const bool norm = name.find("norm") != std::string::npos;
      const bool bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
      const bool embed = name.find("embedding") != std::string::npos || name == "shared.weight";
      w[name] = norm && !bias ? at::ones(shape, o) : bias ? at::zeros(shape, o)
                                                          : at::empty(shape, o).normal_(0, embed ? embed_std : linear_std);
    }
    return w;
  }
  for (const auto& [name, shape] : shapes) {
    const bool norm = name.find("norm") != std::string::npos;
    const bool bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    const bool embed = name.find("embedding") != std::string::npos || name == "shared.weight";
    at::Tensor t;
    if (norm && !bias)
      t = at::ones(shape, at::kFloat);
    else if (bias)
      t = at::zeros(shape, at::kFloat);
    else
      t = at::empty(shape, at::kFloat).normal_(0, embed ? embed_std : linear_std, gen);
    w[name] = t.to(dtype);
  }
  return w;
}

void copy_file(const std::string& from, const std::string& to) {
  if (!path_exists(from))
    throw Error(from + ": missing (tokenizer data for the tiny text encoders; set FLUXTRAIN_TOKENIZER_DATA to a "
                "folder with clip/vocab.json, clip/merges.txt, t5/spiece.model)");
  const std::string bytes = read_text_file(from);
  AtomicFile f(to);
  f.write(bytes.data(), bytes.size());
  f.commit();
}

}  // namespace

TensorMap random_clip_weights(const ClipTextConfig& cfg, uint64_t seed, at::ScalarType dtype, at::Device device) {
  return random_from_shapes(ClipTextModel::expected_shapes(cfg), derive_seed(seed, RngPurpose::Synthetic, 0xC1, 0),
                            dtype, 0.02, 0.02, device);
}

TensorMap random_t5_weights(const T5EncoderConfig& cfg, uint64_t seed, at::ScalarType dtype, at::Device device) {
  return random_from_shapes(T5Encoder::expected_shapes(cfg), derive_seed(seed, RngPurpose::Synthetic, 0x75, 0), dtype,
                            1.0, 0.05, device);
}

TensorMap random_t5_weights_meta_layers(const T5EncoderConfig& cfg, uint64_t seed, at::ScalarType dtype) {
  std::map<std::string, std::vector<int64_t>> drawn;
  TensorMap w;
  for (const auto& [name, shape] : T5Encoder::expected_shapes(cfg)) {
    if (name.rfind("encoder.block.", 0) == 0 && name.find("relative_attention_bias") == std::string::npos)
      w[name] = at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kMeta));
    else
      drawn.emplace(name, shape);
  }
  for (auto& kv : random_from_shapes(drawn, derive_seed(seed, RngPurpose::Synthetic, 0x75, 0), dtype, 1.0, 0.05,
                                     at::kCPU))
    w.emplace(kv.first, kv.second);
  return w;
}

TensorMap random_t5_layer_weights(const T5EncoderConfig& cfg, uint64_t seed, int64_t layer, at::ScalarType dtype) {
  const std::string prefix = "encoder.block." + std::to_string(layer) + ".";
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& [name, shape] : T5Encoder::expected_shapes(cfg))
    if (name.rfind(prefix, 0) == 0 && name.find("relative_attention_bias") == std::string::npos)
      shapes.emplace(name.substr(prefix.size()), shape);
  return random_from_shapes(shapes, derive_seed(seed, RngPurpose::Synthetic, 0x75, static_cast<uint64_t>(layer) + 1),
                            dtype, 1.0, 0.05, at::kCPU);
}

std::string tokenizer_data_dir() {
  if (const char* e = std::getenv("FLUXTRAIN_TOKENIZER_DATA"); e && *e) return e;
  return FLUXTRAIN_TOKENIZER_DATA_DIR;
}

void write_tiny_text_encoders(const std::string& dir, int64_t clip_hidden, int64_t t5_d_model, uint64_t seed,
                              at::ScalarType dtype) {
  const std::string data = tokenizer_data_dir();
  const std::string tok = path_join(dir, "tokenizer"), tok2 = path_join(dir, "tokenizer_2");
  make_directories(tok);
  make_directories(tok2);
  copy_file(path_join(data, "clip/vocab.json"), path_join(tok, "vocab.json"));
  copy_file(path_join(data, "clip/merges.txt"), path_join(tok, "merges.txt"));
  copy_file(path_join(data, "t5/spiece.model"), path_join(tok2, "spiece.model"));
  // The config files FLUX.1-dev's tokenizer folders carry (the fields that matter).
  write_text_file_atomic(path_join(tok, "tokenizer_config.json"),
                         nlohmann::json{{"tokenizer_class", "CLIPTokenizer"},
                                        {"model_max_length", 77},
                                        {"do_lower_case", true},
                                        {"bos_token", "<|startoftext|>"},
                                        {"eos_token", "<|endoftext|>"},
                                        {"unk_token", "<|endoftext|>"},
                                        {"pad_token", "<|endoftext|>"}}
                             .dump(2));
  write_text_file_atomic(path_join(tok2, "tokenizer_config.json"),
                         nlohmann::json{{"tokenizer_class", "T5Tokenizer"},
                                        {"model_max_length", 512},
                                        {"extra_ids", 100},
                                        {"eos_token", "</s>"},
                                        {"unk_token", "<unk>"},
                                        {"pad_token", "<pad>"}}
                             .dump(2));

  const ClipTextConfig clip = ClipTextConfig::tiny(clip_hidden);
  const std::string te = path_join(dir, "text_encoder");
  make_directories(te);
  save_hf_weights(te, random_clip_weights(clip, seed, dtype), UINT64_MAX);
  nlohmann::json cj = clip.to_json();
  cj["torch_dtype"] = dtype == at::kBFloat16 ? "bfloat16" : dtype == at::kHalf ? "float16" : "float32";
  write_text_file_atomic(path_join(te, "config.json"), cj.dump(2));

  const T5EncoderConfig t5 = T5EncoderConfig::tiny(t5_d_model);
  const std::string te2 = path_join(dir, "text_encoder_2");
  make_directories(te2);
  const TensorMap w2 = random_t5_weights(t5, seed, dtype);
  uint64_t total = 0;
  for (const auto& kv : w2) total += kv.second.nbytes();
  save_hf_weights(te2, w2, total / 3 + 1);  // sharded, as FLUX's text_encoder_2/ is
  nlohmann::json tj = t5.to_json();
  tj["torch_dtype"] = cj["torch_dtype"];
  write_text_file_atomic(path_join(te2, "config.json"), tj.dump(2));

  const std::string index_path = path_join(dir, "model_index.json");
  if (path_exists(index_path)) {
    nlohmann::json index = nlohmann::json::parse(read_text_file(index_path));
    index["text_encoder"] = {"transformers", "CLIPTextModel"};
    index["tokenizer"] = {"transformers", "CLIPTokenizer"};
    index["text_encoder_2"] = {"transformers", "T5EncoderModel"};
    index["tokenizer_2"] = {"transformers", "T5TokenizerFast"};
    write_text_file_atomic(index_path, index.dump(2));
  }
}

}  // namespace fluxtrain
