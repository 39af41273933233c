#include "encoders/text_encoders.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"

namespace fluxtrain {
namespace {

const char* kClipPrefix = "text_encoder.";
const char* kT5Prefix = "text_encoder_2.";
const char* kMetaKey = "fluxtrain_text_encoder_lora";

std::vector<std::string> projs_of(const std::vector<TextLoraTarget>& t) {
  std::vector<std::string> p;
  for (const auto& x : t)
    if (std::find(p.begin(), p.end(), x.proj) == p.end()) p.push_back(x.proj);
  return p;
}

at::Tensor ids_tensor(const std::vector<std::vector<int64_t>>& rows, int64_t width) {
  at::Tensor t = at::empty({static_cast<int64_t>(rows.size()), width}, at::kLong);
  int64_t* p = t.data_ptr<int64_t>();
  for (const auto& r : rows) {
    std::copy(r.begin(), r.end(), p);
    p += width;
  }
  return t;
}

}  // namespace

TextEncoderSetup TextEncoderSetup::for_training(const std::string& snapshot_dir, const TextEncoderOptions& o,
                                                at::ScalarType dtype, at::Device device, uint64_t seed,
                                                bool gradient_checkpointing) {
  o.validate();
  TextEncoderSetup s;
  s.snapshot_dir = snapshot_dir;
  // Training from captions needs both conditioning inputs; only CLIP's LoRA trains in one_only mode.
  s.load_clip = s.load_t5 = o.needs_encoders();
  s.train_clip = o.trains_clip();
  s.train_t5 = o.trains_t5();
  s.rank = o.text_encoder_rank;
  s.alpha = o.text_encoder_alpha;
  s.max_sequence_length = o.max_sequence_length;
  s.dtype = dtype;
  s.device = device;
  s.seed = seed;
  s.gradient_checkpointing = gradient_checkpointing;
  return s;
}

TextEncoders::TextEncoders(TextEncoders&&) noexcept = default;
TextEncoders& TextEncoders::operator=(TextEncoders&&) noexcept = default;
TextEncoders::~TextEncoders() = default;

TextEncoders TextEncoders::load(const TextEncoderSetup& s) {
  check_input(!(s.train_clip && !s.load_clip), "text encoders: training CLIP's LoRA needs CLIP loaded");
  check_input(!(s.train_t5 && !s.load_t5), "text encoders: training T5's LoRA needs T5 loaded");
  check_input(s.max_sequence_length >= 1, "text encoders: max_sequence_length must be positive");
  check_input(is_directory(s.snapshot_dir), s.snapshot_dir + ": not a directory (expected a FLUX snapshot with "
                                                             "tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/)");
  TextEncoders e;
  e.setup_ = s;
  if (s.load_clip) {
    e.clip_tok_ = std::make_unique<ClipTokenizer>(path_join(s.snapshot_dir, "tokenizer"));
    if (!s.tokenizers_only) e.clip_ = ClipTextModel::load(path_join(s.snapshot_dir, "text_encoder"), s.dtype, s.device);
  }
  if (s.load_t5) {
    e.t5_tok_ = std::make_unique<T5Tokenizer>(path_join(s.snapshot_dir, "tokenizer_2"));
    if (!s.tokenizers_only && s.place_t5) {
      e.t5_ = T5Encoder::load_stored(path_join(s.snapshot_dir, "text_encoder_2"));
      s.place_t5(*e.t5_);
    } else if (!s.tokenizers_only) {
      e.t5_ = T5Encoder::load(path_join(s.snapshot_dir, "text_encoder_2"), s.dtype, s.device);
    }
  }
  if (s.train_clip && e.clip_) {
    e.clip_lora_ = TextEncoderLora::create(ClipTextModel::lora_targets(e.clip_->config()), s.rank, s.alpha, s.seed);
    e.clip_lora_.to(s.device);
  }
  if (s.train_t5 && e.t5_) {
    e.t5_lora_ = TextEncoderLora::create(T5Encoder::lora_targets(e.t5_->config()), s.rank, s.alpha, s.seed + 1);
    e.t5_lora_.to(s.device);
  }
  return e;
}

TextEncoding TextEncoders::tokenize(const std::vector<std::string>& captions) const {
  TextEncoding out;
  if (clip_tok_) {
    std::vector<std::vector<int64_t>> rows;
    for (const auto& c : captions) rows.push_back(clip_tok_->encode(c, /*pad=*/true));
    out.clip_input_ids = ids_tensor(rows, clip_tok_->max_length());
  }
  if (t5_tok_) {
    std::vector<std::vector<int64_t>> rows;
    for (const auto& c : captions) rows.push_back(t5_tok_->encode(c, setup_.max_sequence_length, /*pad=*/true));
    out.t5_input_ids = ids_tensor(rows, setup_.max_sequence_length);
  }
  return out;
}

TextEncoding TextEncoders::encode_ids(const at::Tensor& clip_ids, const at::Tensor& t5_ids) {
  TextEncoding out;
  out.clip_input_ids = clip_ids;
  out.t5_input_ids = t5_ids;
  if (clip_ && clip_ids.defined())
    out.pooled_prompt_embeds =
        clip_->forward(clip_ids, clip_lora_.empty() ? nullptr : &clip_lora_, setup_.gradient_checkpointing).pooled;
  if (t5_ && t5_ids.defined())
    out.prompt_embeds = t5_->forward(t5_ids, t5_lora_.empty() ? nullptr : &t5_lora_, setup_.gradient_checkpointing);
  return out;
}

TextEncoding TextEncoders::encode(const std::vector<std::string>& captions) {
  const TextEncoding ids = tokenize(captions);
  return encode_ids(ids.clip_input_ids, ids.t5_input_ids);
}

void TextEncoders::set_lora(TextEncoderLora clip, TextEncoderLora t5) {
  check_input(clip.empty() || clip_, "text encoder LoRA for CLIP given but CLIP is not loaded");
  check_input(t5.empty() || t5_, "text encoder LoRA for T5 given but T5 is not loaded");
  clip_lora_ = std::move(clip);
  t5_lora_ = std::move(t5);
  if (!clip_lora_.empty()) clip_lora_.to(setup_.device);
  if (!t5_lora_.empty()) t5_lora_.to(setup_.device);
}

TensorMap TextEncoders::lora_state() const {
  TensorMap m = clip_lora_.state(kClipPrefix);
  for (auto& kv : t5_lora_.state(kT5Prefix)) m[kv.first] = kv.second;
  return m;
}

void TextEncoders::load_lora_state(const TensorMap& state, const std::string& source) {
  for (const auto& kv : state) {
    const bool t5 = kv.first.rfind(kT5Prefix, 0) == 0, clip = !t5 && kv.first.rfind(kClipPrefix, 0) == 0;
    check_input(t5 || clip, source + ": '" + kv.first + "' is not a text encoder LoRA tensor");
    check_input(!(clip && clip_lora_.empty()), source + ": has CLIP LoRA tensors but CLIP's LoRA does not train");
    check_input(!(t5 && t5_lora_.empty()), source + ": has T5 LoRA tensors but T5's LoRA does not train");
  }
  if (!clip_lora_.empty()) clip_lora_.load_state(state, kClipPrefix, source);
  if (!t5_lora_.empty()) t5_lora_.load_state(state, kT5Prefix, source);
}

TensorMap TextEncoders::lora_state_kohya() const {
  TensorMap m;
  if (!clip_lora_.empty()) m = clip_lora_.kohya_state("lora_te1");
  if (!t5_lora_.empty())
    for (auto& kv : t5_lora_.kohya_state("lora_te3")) m.emplace(kv.first, kv.second);
  return m;
}

void TextEncoders::save_lora_diffusers(const std::string& path) const {
  check_input(!clip_lora_.empty() || !t5_lora_.empty(), "text encoders: no LoRA to save");
  nlohmann::json ours = nlohmann::json::object(), adapter = nlohmann::json::object();
  if (!clip_lora_.empty()) {
    ours["text_encoder"] = {{"rank", clip_lora_.rank()}, {"alpha", clip_lora_.alpha()}};
    // diffusers packs the peft LoraConfig of each component under "<component>.<field>".
    adapter["text_encoder.r"] = clip_lora_.rank();
    adapter["text_encoder.lora_alpha"] = clip_lora_.alpha();
    adapter["text_encoder.target_modules"] = projs_of(ClipTextModel::lora_targets(clip_->config()));
  }
  if (!t5_lora_.empty()) ours["text_encoder_2"] = {{"rank", t5_lora_.rank()}, {"alpha", t5_lora_.alpha()}};
  std::map<std::string, std::string> md{{"format", "pt"}, {kMetaKey, ours.dump()}};
  if (!adapter.empty()) md["lora_adapter_metadata"] = adapter.dump();
  safetensors::save(path, lora_state(), md);
}

int64_t TextEncoders::resident_bytes() const {
  return (clip_ ? clip_->resident_bytes() : 0) + (t5_ ? t5_->resident_bytes() : 0);
}

TextEncoderLoraFile load_text_encoder_lora_file(const std::string& path, const ClipTextConfig* clip_cfg,
                                                const T5EncoderConfig* t5_cfg, double alpha_fallback) {
  if (!path_exists(path)) throw Error(path + ": missing (text encoder LoRA file)");
  safetensors::File f(path);
  // Normalise every key to "text_encoder." / "text_encoder_2." + module + ".lora_{A,B}.weight".
  TensorMap clip_t, t5_t;
  // kohya names lose the dots of the module path: look them up among the known targets.
  std::map<std::string, std::pair<std::string, bool>> kohya;  // kohya module -> (module, is T5)
  if (clip_cfg)
    for (const auto& t : ClipTextModel::lora_targets(*clip_cfg)) kohya[kohya_text_module("lora_te1", t.module)] = {t.module, false};
  if (t5_cfg)
    for (const auto& t : T5Encoder::lora_targets(*t5_cfg)) kohya[kohya_text_module("lora_te3", t.module)] = {t.module, true};
  std::map<bool, double> kohya_alpha;
  for (const auto& kv : f.entries()) {
    std::string k = kv.first;
    if (k.rfind("lora_unet_", 0) == 0) continue;  // a kohya transformer LoRA in the same file
    if (k.rfind("lora_te", 0) == 0) {
      const size_t dot = k.find('.');
      const std::string mod = k.substr(0, dot), what = dot == std::string::npos ? "" : k.substr(dot);
      auto it = kohya.find(mod);
      if (it == kohya.end())
        throw Error(path + ": '" + k + "' is not a kohya text encoder module of the loaded " +
                    (mod.rfind("lora_te3", 0) == 0 ? "T5" : "CLIP"));
      const bool t5 = it->second.second;
      const std::string stem = (t5 ? kT5Prefix : kClipPrefix) + it->second.first;
      if (what == ".alpha") kohya_alpha[t5] = f.load(k).item<double>();
      else if (what == ".lora_down.weight") (t5 ? t5_t : clip_t)[stem + ".lora_A.weight"] = f.load(k);
      else if (what == ".lora_up.weight") (t5 ? t5_t : clip_t)[stem + ".lora_B.weight"] = f.load(k);
      else throw Error(path + ": '" + k + "' is not a kohya LoRA tensor (.lora_down.weight, .lora_up.weight, .alpha)");
      continue;
    }
    for (const char* form : {".lora_A.default.weight", ".lora_B.default.weight"}) {
      const size_t at = k.find(form);
      if (at != std::string::npos) k = k.substr(0, at) + (form[6] == 'A' ? ".lora_A.weight" : ".lora_B.weight");
    }
    std::string module = k;
    bool is_t5 = false;
    if (k.rfind(kT5Prefix, 0) == 0) {
      module = k.substr(std::string(kT5Prefix).size());
      is_t5 = true;
    } else if (k.rfind(kClipPrefix, 0) == 0) {
      module = k.substr(std::string(kClipPrefix).size());
    } else if (k.rfind("base_model.model.", 0) == 0) {
      module = k.substr(std::string("base_model.model.").size());
      is_t5 = module.rfind("encoder.block.", 0) == 0;
    } else if (k.rfind("transformer.", 0) == 0) {
      continue;  // a transformer LoRA in the same file is not ours to read
    } else {
      throw Error(path + ": '" + kv.first + "' is not a text encoder LoRA key (text_encoder.*, text_encoder_2.* or "
                  "base_model.model.*)");
    }
    // CLIP modules as transformers 5 names them ("encoder.layers.N...") get transformers 4's
    // "text_model." (the names FLUX's LoRA files and fluxtrain use).
    if (!is_t5 && module.rfind("encoder.layers.", 0) == 0) module = "text_model." + module;
    (is_t5 ? t5_t : clip_t)[(is_t5 ? kT5Prefix : kClipPrefix) + module] = f.load(kv.first);
  }
  // Alpha: fluxtrain's metadata, else diffusers' adapter metadata, else the fallback.
  double clip_alpha = alpha_fallback, t5_alpha = alpha_fallback;
  try {
    auto it = f.metadata().find(kMetaKey);
    if (it != f.metadata().end()) {
      const auto j = nlohmann::json::parse(it->second);
      if (j.contains("text_encoder")) clip_alpha = j["text_encoder"].at("alpha").get<double>();
      if (j.contains("text_encoder_2")) t5_alpha = j["text_encoder_2"].at("alpha").get<double>();
    } else if ((it = f.metadata().find("lora_adapter_metadata")) != f.metadata().end()) {
      const auto j = nlohmann::json::parse(it->second);
      if (j.contains("text_encoder.lora_alpha")) clip_alpha = j["text_encoder.lora_alpha"].get<double>();
      if (j.contains("text_encoder_2.lora_alpha")) t5_alpha = j["text_encoder_2.lora_alpha"].get<double>();
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": bad LoRA metadata (" + std::string(e.what()) + ")");
  }
  if (kohya_alpha.count(false)) clip_alpha = kohya_alpha[false];
  if (kohya_alpha.count(true)) t5_alpha = kohya_alpha[true];
  TextEncoderLoraFile out;
  if (!clip_t.empty()) {
    check_input(clip_cfg != nullptr, path + ": has CLIP LoRA tensors but CLIP is not loaded");
    out.clip = TextEncoderLora::from_state(ClipTextModel::lora_targets(*clip_cfg), clip_t, kClipPrefix, clip_alpha, path);
  }
  if (!t5_t.empty()) {
    check_input(t5_cfg != nullptr, path + ": has T5 LoRA tensors but T5 is not loaded");
    out.t5 = TextEncoderLora::from_state(T5Encoder::lora_targets(*t5_cfg), t5_t, kT5Prefix, t5_alpha, path);
  }
  if (out.clip.empty() && out.t5.empty()) throw Error(path + ": holds no text encoder LoRA tensors");
  return out;
}

}  // namespace fluxtrain
