// T5 under the low-memory options (train/setup.h place_t5_low_memory, issue 14's text-encoder
// rows): streamed layers give bit-identical outputs and LoRA gradients to the resident encoder,
// fp8 layers bit-identical ones to a resident encoder holding the dequantised weights, forward
// and backward, with and without checkpointing. CPU, float32.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "encoders/t5_encoder.h"
#include "encoders/text_encoder_lora.h"
#include "encoders/tiny_text_encoders.h"
#include "kernels/fp8.h"
#include "train/setup.h"

namespace fluxtrain {
namespace {

struct Pass {
  at::Tensor out;
  std::vector<at::Tensor> grads;
};

TextEncoderLora trained_lora(const T5EncoderConfig& c) {
  TextEncoderLora lora = TextEncoderLora::create(T5Encoder::lora_targets(c), 4, 4.0, 7);
  at::NoGradGuard g;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  for (auto& p : lora.parameters()) p.copy_(at::randn(p.sizes(), gen) * 0.1);  // up is 0 at init: move it
  return lora;
}

Pass run(T5Encoder& t5, const TextEncoderLora& lora, const at::Tensor& ids, bool ckpt) {
  for (auto p : lora.parameters()) p.mutable_grad().reset();
  const at::Tensor out = t5.forward(ids, &lora, ckpt);
  (out * out).sum().backward();
  Pass r{out.detach(), {}};
  for (const auto& p : lora.parameters()) r.grads.push_back(p.grad().clone());
  return r;
}

void expect_identical(const Pass& a, const Pass& b, const std::string& what) {
  EXPECT_TRUE(at::equal(a.out, b.out)) << what << ": outputs differ by " << (a.out - b.out).abs().max().item<double>();
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (size_t i = 0; i < a.grads.size(); ++i)
    EXPECT_TRUE(at::equal(a.grads[i], b.grads[i])) << what << ": gradient " << i << " differs";
}

class T5LowMemory : public ::testing::Test {
 protected:
  T5EncoderConfig cfg = T5EncoderConfig::tiny(32);
  TensorMap hf = random_t5_weights(cfg, 3, at::kFloat);
  at::Tensor ids = at::randint(cfg.vocab_size, {2, 9}, at::TensorOptions().dtype(at::kLong));
};

TEST_F(T5LowMemory, StreamedLayersMatchResident) {
  T5Encoder resident(cfg, hf, "random T5");
  T5Encoder streamed(cfg, hf, "random T5");
  dist::LowMemoryOptions o;
  o.blocks_to_swap = 2;  // the transformer streams: every T5 layer streams
  const std::string plan = place_t5_low_memory(streamed, o, at::kCPU, at::kFloat);
  EXPECT_NE(plan.find(std::to_string(cfg.num_layers) + " streamed"), std::string::npos) << plan;
  ASSERT_TRUE(streamed.has_layer_provider());
  EXPECT_TRUE(streamed.weights().layers_.empty());  // the loaded copies were dropped
  const TextEncoderLora lora = trained_lora(cfg);
  for (bool ckpt : {false, true})
    expect_identical(run(resident, lora, ids, ckpt), run(streamed, lora, ids, ckpt),
                     ckpt ? "streamed, checkpointing" : "streamed");
}

TEST_F(T5LowMemory, Fp8LayersMatchResidentDequantised) {
  // Reference: every 2-D layer weight replaced by its e4m3 round trip (per output channel).
  TensorMap deq = hf;
  for (auto& [name, t] : deq)
    if (name.rfind("encoder.block.", 0) == 0 && t.dim() == 2 && name.find("relative_attention_bias") == std::string::npos) {
      const kernels::Fp8Tensor q = kernels::fp8_quantise(t, kernels::Fp8Scaling::PerChannel);
      t = kernels::fp8_dequantise(q.data, q.scale, at::kFloat);
    }
  T5Encoder reference(cfg, deq, "dequantised T5");
  const TextEncoderLora lora = trained_lora(cfg);
  for (bool stream : {false, true}) {
    T5Encoder fp8(cfg, hf, "random T5");
    dist::LowMemoryOptions o;
    o.base_precision = "fp8";
    o.blocks_to_swap = stream ? -1 : 0;
    o.fp8_matmul = stream;  // the transformer's option: T5 still gets dequantised layers, bit-identical
    place_t5_low_memory(fp8, o, at::kCPU, at::kFloat);
    for (bool ckpt : {false, true})
      expect_identical(run(reference, lora, ids, ckpt), run(fp8, lora, ids, ckpt),
                       std::string(stream ? "fp8 streamed" : "fp8 resident") + (ckpt ? ", checkpointing" : ""));
  }
  // And the quantisation is real: the output differs from the bf16/float32 weights'.
  T5Encoder plain(cfg, hf, "random T5");
  EXPECT_FALSE(at::equal(run(plain, lora, ids, false).out, run(reference, lora, ids, false).out));
}

TEST_F(T5LowMemory, LayersDrawnOneAtATimeMatchTheWholeModel) {
  // The bench's low-memory T5: meta layers in the encoder, each layer drawn as the stack packs it.
  TensorMap whole = random_t5_weights_meta_layers(cfg, 5, at::kFloat);
  for (int64_t i = 0; i < cfg.num_layers; ++i)
    for (auto& [name, t] : random_t5_layer_weights(cfg, 5, i, at::kFloat))
      whole["encoder.block." + std::to_string(i) + "." + name] = t;
  for (const auto& [name, t] : whole) ASSERT_FALSE(t.is_meta()) << name << " was not drawn";
  T5Encoder resident(cfg, whole, "random T5");
  T5Encoder drawn(cfg, random_t5_weights_meta_layers(cfg, 5, at::kFloat), "random T5, meta layers");
  dist::LowMemoryOptions o;
  o.blocks_to_swap = -1;
  place_t5_low_memory(drawn, o, at::kCPU, at::kFloat,
                      [this](int i) { return random_t5_layer_weights(cfg, 5, i, at::kFloat); });
  const TextEncoderLora lora = trained_lora(cfg);
  expect_identical(run(resident, lora, ids, true), run(drawn, lora, ids, true), "layers drawn one at a time");
}

TEST_F(T5LowMemory, NoOptionsLeaveItResident) {
  T5Encoder t5(cfg, hf, "random T5");
  EXPECT_EQ(place_t5_low_memory(t5, dist::LowMemoryOptions{}, at::kCPU, at::kFloat), "");
  EXPECT_FALSE(t5.has_layer_provider());
}

}  // namespace
}  // namespace fluxtrain
