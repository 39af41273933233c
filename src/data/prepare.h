// fluxtrain prepare: EasyControl's jsonl + images -> the HDF5 dataset of docs/dataset.md.
//
// Each jsonl line names a target image, a caption and condition images (columns chosen like
// EasyControl's train.py: --target_column, --caption_column, --subject_column, --spatial_column,
// the last two comma-separated; paths relative to the jsonl file). Every line is validated
// (JSON, keys, files, decodability, caption, condition count); bad lines are skipped and reported
// (--on_bad_sample skip) or nothing is written (fail). Targets go to aspect buckets (buckets.h),
// spatial conditions are resized to cond_size^2, subject conditions fitted into cond_size with
// EasyControl's augmentation (cached as --augment_variants variants, or applied online when the
// latents are not cached). Output is atomic (temp file + rename); each sample carries a content
// hash (image bytes, caption, settings, VAE and text encoder identity), so a re-run on unchanged
// input writes nothing and a changed input re-encodes only the changed samples.
#pragma once
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include "encoders/autoencoder.h"

namespace fluxtrain {

// What a text encoder gives prepare for a batch of captions (the text-encoder issue provides it).
struct TextEmbeddings {
  at::Tensor t5;      // [B, T, D]
  at::Tensor pooled;  // [B, P]
};

// Hook through which prepare caches text embeddings (--cache_text_embeddings). prepare calls
// encode() with batches of captions (and once with {" "} for caption dropout) and stores the
// result; identity must change whenever the embeddings would (weights, max length, dtype), since
// it is part of every sample's content hash.
struct TextEncoderHook {
  int64_t text_len = 0, text_dim = 0, pooled_dim = 0;
  std::string identity;
  std::function<TextEmbeddings(const std::vector<std::string>& captions)> encode;
};

struct PrepareOptions {
  std::string model;               // --pretrained_model_name_or_path: holds the VAE (ae.safetensors or vae/)
  std::string vae_layout = "auto";
  std::string jsonl;               // --train_data_dir
  std::string output;              // --output
  std::string target_column = "target", caption_column = "caption";
  std::string subject_column = "None", spatial_column = "None";  // comma-separated; "None" = none
  int64_t lora_num = -1;           // expected condition columns (-1: whatever the columns give)
  int64_t noise_size = 1024, cond_size = 512;
  double bucket_max_aspect = 4.0;
  bool cache_latents = false;
  int64_t augment_variants = 1;    // cached subject augmentation variants (--cache_latents)
  double caption_dropout = 0.1;    // EasyControl: 10% of captions become " "
  std::string on_bad_sample = "skip";
  uint64_t seed = 0;               // draws of the cached variants
  at::ScalarType latent_dtype = at::kFloat;
  at::ScalarType embed_dtype = at::kBFloat16;  // cached T5/CLIP embeddings (--cache_text_embeddings)
  std::string device = "cpu";      // VAE device
  at::ScalarType vae_dtype = at::kFloat;
  // Tiles only images larger than tile_px: 1024 px targets are encoded whole (tiling changes
  // GroupNorm statistics, see autoencoder.h), 2048 px ones in 1024 px tiles.
  TileOptions tile{1024, 256};
  const TextEncoderHook* text = nullptr;        // null: captions only
  std::FILE* log = stderr;
  int tty = -1;                    // progress bar: -1 detect, 0/1 force
};

struct BadSample {
  int64_t line = 0;
  std::string path;    // the file concerned, or the jsonl file
  std::string reason;
};

struct PrepareSummary {
  bool up_to_date = false;    // nothing to do: the output matches the input
  int64_t lines = 0;
  int64_t written = 0, reused = 0, encoded = 0;
  std::vector<BadSample> bad;
  std::map<std::string, int64_t> buckets;  // "WxH" -> samples
  int64_t bytes = 0;
  double seconds = 0;
};

// Runs prepare; throws Error (nothing written, an existing output untouched) on bad options,
// on bad lines with on_bad_sample "fail", or when no line is usable.
PrepareSummary prepare_dataset(const PrepareOptions& opt);

// The summary as printed at the end (several lines) and as one JSON object (benchmark).
std::string format_summary(const PrepareSummary& s, const std::string& output);
std::string summary_json(const PrepareSummary& s, const PrepareOptions& opt);

}  // namespace fluxtrain
