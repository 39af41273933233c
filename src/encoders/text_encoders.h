// The text conditioning of FLUX as the trainer uses it: CLIP-L's pooled output and T5's hidden
// states for a batch of captions, from a snapshot in the Hugging Face layout
// (tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/), with optional LoRA on either
// encoder, differentiable w.r.t. those LoRA masters only.
//
//   TextEncoderSetup s; s.snapshot_dir = dir; s.train_clip = true; ...
//   TextEncoders enc = TextEncoders::load(s);
//   TextEncoding e = enc.encode(captions);   // e.prompt_embeds [B, L, d_model], e.pooled [B, hidden]
//   optimizer groups: enc.clip_lora_parameters(), enc.t5_lora_parameters()
//   checkpoint: enc.lora_state() / enc.load_lora_state(); output: enc.save_lora_diffusers(path)
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "core/tensor_map.h"
#include "encoders/clip_text_model.h"
#include "encoders/clip_tokenizer.h"
#include "encoders/t5_encoder.h"
#include "encoders/t5_tokenizer.h"
#include "encoders/text_encoder_lora.h"
#include "encoders/text_encoder_options.h"

namespace fluxtrain {

struct TextEncoderSetup {
  std::string snapshot_dir;
  bool load_clip = true, load_t5 = true;  // only what the mode needs
  bool tokenizers_only = false;           // read no encoder weights (encode --tokenize_only)
  at::ScalarType dtype = at::kFloat;      // compute dtype of the frozen weights
  at::Device device = at::kCPU;
  int64_t max_sequence_length = 512;
  bool train_clip = false, train_t5 = false;  // create LoRA masters (need load_clip / load_t5)
  int64_t rank = 64;
  double alpha = 64;
  uint64_t seed = 0;
  bool gradient_checkpointing = false;
  // When set, T5 is read as stored (host, no copy) and this places its frozen weights (the
  // low-memory engine: fp8 and/or streamed layers, train/setup.h place_t5_low_memory) instead
  // of moving them all to `device` in `dtype`.
  std::function<void(T5Encoder&)> place_t5;

  // The setup `fluxtrain train` wants for its options (neither mode: nothing to load).
  static TextEncoderSetup for_training(const std::string& snapshot_dir, const TextEncoderOptions& o,
                                       at::ScalarType dtype, at::Device device, uint64_t seed,
                                       bool gradient_checkpointing);
};

struct TextEncoding {
  at::Tensor clip_input_ids;        // [B, 77] int64 (CLIP padded as FLUX pads)
  at::Tensor t5_input_ids;          // [B, L] int64
  at::Tensor pooled_prompt_embeds;  // [B, clip hidden]      (undefined without CLIP weights)
  at::Tensor prompt_embeds;         // [B, L, T5 d_model]    (undefined without T5 weights)
};

class TextEncoders {
 public:
  static TextEncoders load(const TextEncoderSetup& setup);
  TextEncoders(TextEncoders&&) noexcept;
  TextEncoders& operator=(TextEncoders&&) noexcept;
  ~TextEncoders();

  // Token ids only (no weights needed).
  TextEncoding tokenize(const std::vector<std::string>& captions) const;
  // Tokenises and runs the loaded encoders. With grad mode on, the outputs carry the graph to the
  // LoRA masters (and nothing else: frozen weights never require grad).
  TextEncoding encode(const std::vector<std::string>& captions);
  // Same from ids (clip_ids [B, 77], t5_ids [B, L]; either may be undefined to skip that encoder).
  TextEncoding encode_ids(const at::Tensor& clip_ids, const at::Tensor& t5_ids);

  bool has_clip() const { return clip_ != nullptr; }
  bool has_t5() const { return t5_ != nullptr; }
  ClipTextModel* clip() { return clip_.get(); }
  T5Encoder* t5() { return t5_.get(); }
  const ClipTokenizer* clip_tokenizer() const { return clip_tok_.get(); }
  const T5Tokenizer* t5_tokenizer() const { return t5_tok_.get(); }

  // LoRA masters, for one optimizer parameter group per encoder (empty when that one is frozen).
  std::vector<at::Tensor> clip_lora_parameters() const { return clip_lora_.parameters(); }
  std::vector<at::Tensor> t5_lora_parameters() const { return t5_lora_.parameters(); }
  TextEncoderLora& clip_lora() { return clip_lora_; }
  TextEncoderLora& t5_lora() { return t5_lora_; }
  // Attach LoRA weights read from a file (diffusers/peft/fluxtrain keys, see load_text_encoder_lora_file).
  void set_lora(TextEncoderLora clip, TextEncoderLora t5);

  // Checkpoint state: "text_encoder.<module>.lora_A.weight" (CLIP), "text_encoder_2.<module>..." (T5).
  TensorMap lora_state() const;
  // Strict: exactly the trained adapters' keys; values copied into the existing masters.
  void load_lora_state(const TensorMap& state, const std::string& source);
  // The LoRA in the file layout diffusers' FluxPipeline.load_lora_weights reads for the text
  // encoder (peft lora_A/lora_B, "text_encoder." prefix, adapter config in diffusers'
  // lora_adapter_metadata). T5's adapters, which diffusers' FLUX loader does not take, are kept
  // in the same file under "text_encoder_2." (diffusers skips them; fluxtrain reads them back).
  void save_lora_diffusers(const std::string& path) const;
  // The same adapters under kohya/ComfyUI names (lora_te1_* CLIP, lora_te3_* T5, with ".alpha"),
  // for the kohya LoRA file beside the transformer's lora_unet_* modules.
  TensorMap lora_state_kohya() const;
  // Frozen bytes resident for the encoders (for the per-rank memory report).
  int64_t resident_bytes() const;

 private:
  TextEncoders() = default;
  TextEncoderSetup setup_;
  std::unique_ptr<ClipTokenizer> clip_tok_;
  std::unique_ptr<T5Tokenizer> t5_tok_;
  std::unique_ptr<ClipTextModel> clip_;
  std::unique_ptr<T5Encoder> t5_;
  TextEncoderLora clip_lora_, t5_lora_;
};

// Reads a text-encoder LoRA file: keys "text_encoder.*" / "text_encoder_2.*" (diffusers, fluxtrain),
// kohya's "lora_te1_*" (CLIP) / "lora_te3_*" (T5, alpha from their ".alpha"), or peft's "base_model.model.*" (the encoder told apart by its module names); "lora_A.default"
// forms accepted. Alpha from the metadata (fluxtrain's or diffusers' lora_adapter_metadata), else
// alpha_fallback (<= 0: alpha = rank). Either result may be empty when the file has none for it.
struct TextEncoderLoraFile {
  TextEncoderLora clip, t5;
};
TextEncoderLoraFile load_text_encoder_lora_file(const std::string& path, const ClipTextConfig* clip_cfg,
                                                const T5EncoderConfig* t5_cfg, double alpha_fallback = 0);

}  // namespace fluxtrain
