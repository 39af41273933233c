// Validation images during training (EasyControl's log_validation, without a second pipeline):
// every --validation_steps updates and at the last one, --num_validation_images pictures of
// --validation_prompt at --test_h x --test_w, with --subject_test_images / --spatial_test_images
// as EasyControl conditions, drawn by the sampler (train/sampler.h) with the run's own LoRA and
// frozen-weights provider. Image k starts from the noise of (seed, k) at every validation, so the
// pictures compare from step to step and a resumed run continues the same series.
//
// Where the work happens (collective: every rank constructs it and calls draw() at the same steps):
//  - text: the prompt is encoded where the run's text encoders are (its --encoder_process, or the
//    one process). A run without text encoders (cached embeddings) loads them once at the start
//    on rank 0 (on --text_encoder_device, else the CPU when a low-memory option is set, else the
//    training device), encodes the prompt and frees them. Frozen encoders encode once; a
//    training text-encoder LoRA is applied afresh at every validation. The states go to every rank.
//  - images are spread over the ranks (image k on rank k mod W); every rank runs the same number
//    of transformer calls (a rank with fewer images draws a spare one that is thrown away),
//    because sharded weights all-gather every block in every call.
//  - rank 0 holds the autoencoder: it encodes the condition images once, sends their latents to
//    every rank, and decodes everyone's final latents into <output_dir>/validation/step-S-K.png.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fluxtrain {

struct RunConfig;
struct FluxConfig;
struct Runtime;
class BlockWeights;
class LoraSet;
class TextEncoders;
class Autoencoder;

class ValidationImages {
 public:
  struct Context {
    const RunConfig* cfg = nullptr;
    const FluxConfig* model = nullptr;
    const Runtime* rt = nullptr;
    int rank = 0, world_size = 1;
    TextEncoders* text = nullptr;  // the run's text encoders on this rank (null: none here)
    bool run_has_text = false;     // some rank holds text encoders
    bool text_trains = false;      // a text-encoder LoRA trains: encode at every validation
    int text_rank = 0;             // the rank that holds them
  };
  // Collective. Does nothing (and loads nothing) without --validation_prompt.
  explicit ValidationImages(const Context& c);
  ~ValidationImages();

  bool enabled() const { return enabled_; }
  // After update `step` of max_steps (step >= 1).
  bool due(int64_t step, int64_t max_steps) const;
  // Collective. On rank 0: the images [N, H, W, 3] uint8, also written as PNG files (their paths
  // in *written); an undefined tensor on the other ranks.
  at::Tensor draw(int64_t step, BlockWeights& weights, const LoraSet& lora, std::vector<std::string>* written = nullptr);

 private:
  Context c_;
  bool enabled_ = false;
  int64_t steps_ = 28;
  at::Tensor prompt_embeds_, pooled_;        // [1, T, D], [1, D] float32 CPU (frozen text)
  std::vector<at::Tensor> cond_latents_;     // [C, h, w] float32 CPU, every rank
  std::vector<bool> cond_is_subject_;
  std::unique_ptr<Autoencoder> vae_;         // rank 0 only

  // The prompt's states on every rank (collective).
  void encode_prompt(TextEncoders* local);
  // root's tensor on every rank (collective; shapes travel too).
  at::Tensor share(const at::Tensor& t, int root) const;
};

}  // namespace fluxtrain
