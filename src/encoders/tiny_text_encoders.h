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

// Where the FLUX tokenizer files are read from: $FLUXTRAIN_TOKENIZER_DATA, else the repository's
// tests/data/tokenizers (clip/vocab.json, clip/merges.txt, t5/spiece.model).
std::string tokenizer_data_dir();

// Writes tokenizer/, tokenizer_2/, text_encoder/ (CLIP, hidden = clip_hidden) and text_encoder_2/
// (T5, d_model = t5_d_model, sharded at about a third of its size) into snapshot_dir, and adds
// them to model_index.json when that exists.
void write_tiny_text_encoders(const std::string& snapshot_dir, int64_t clip_hidden, int64_t t5_d_model, uint64_t seed,
                              at::ScalarType dtype);

}  // namespace fluxtrain
