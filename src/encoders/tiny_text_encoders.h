// Random text encoders in the Hugging Face layout, for tests, the quickstart and benchmarks:
// text_encoder/ (CLIPTextModel: config.json + model.safetensors), text_encoder_2/ (T5EncoderModel:
// config.json + shards + model.safetensors.index.json), and the real FLUX tokenizer files in
// tokenizer/ and tokenizer_2/ (copied from the repository's tests/data/tokenizers).
#pragma once
#include <cstdint>
#include <string>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "core/tensor_map.h"
#include "encoders/text_encoder_configs.h"

namespace fluxtrain {

// Random weights under Hugging Face names (deterministic in seed on the CPU; on another device
// drawn there by its default generator, for benchmarks at real sizes).
TensorMap random_clip_weights(const ClipTextConfig& cfg, uint64_t seed, at::ScalarType dtype,
                              at::Device device = at::kCPU);
TensorMap random_t5_weights(const T5EncoderConfig& cfg, uint64_t seed, at::ScalarType dtype,
                            at::Device device = at::kCPU);
// The same model for a caller that places T5's layers itself, a layer at a time (the bench's
// low-memory rows, drawn as `train` reads a snapshot: the host never holds the whole bf16 T5):
// every layer tensor as a meta tensor (shapes only) and the rest (embedding, final norm, the
// relative position bias) drawn on the host; random_t5_layer_weights draws layer i under names
// relative to the layer (the bias, which the encoder keeps with its globals, left out).
TensorMap random_t5_weights_meta_layers(const T5EncoderConfig& cfg, uint64_t seed, at::ScalarType dtype);
TensorMap random_t5_layer_weights(const T5EncoderConfig& cfg, uint64_t seed, int64_t layer, at::ScalarType dtype);

// Where the FLUX tokenizer files are read from: $FLUXTRAIN_TOKENIZER_DATA, else the repository's
// tests/data/tokenizers (clip/vocab.json, clip/merges.txt, t5/spiece.model).
std::string tokenizer_data_dir();

// Writes tokenizer/, tokenizer_2/, text_encoder/ (CLIP, hidden = clip_hidden) and text_encoder_2/
// (T5, d_model = t5_d_model, sharded at about a third of its size) into snapshot_dir, and adds
// them to model_index.json when that exists.
void write_tiny_text_encoders(const std::string& snapshot_dir, int64_t clip_hidden, int64_t t5_d_model, uint64_t seed,
                              at::ScalarType dtype);

}  // namespace fluxtrain
