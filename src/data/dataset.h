// The HDF5 dataset of encoded samples (layout: docs/dataset.md), its writer, the per-epoch data
// order and a background prefetch reader.
//
// Data order: every epoch is a permutation of all samples drawn from (seed, Shuffle, epoch). The
// permutation is cut into global micro-batches of world_size * batch_size samples (a trailing
// partial one is dropped); rank r takes positions [r*B, (r+1)*B) of each. Micro-batches are
// numbered globally across epochs (micro-batch m is in epoch m / per_epoch), so the position in the
// data stream is one integer, stored in checkpoints.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <any>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/hdf5_io.h"

namespace fluxtrain {

struct FluxConfig;
struct SampleDraws;

// One encoded sample as stored. Latents are [C, h, w] (h, w = pixels / 8).
// Datasets written without cached latents (storage "pixels") give target_pixels / cond_pixels
// instead, and encode_latents_online (data/online_vae.h) fills target / conds from them.
// Datasets without cached text embeddings leave t5 / pooled undefined (caption only).
struct Sample {
  int64_t index = -1;              // row in the file
  at::Tensor target;               // [C, h, w]
  std::vector<at::Tensor> conds;   // per condition column [C, hc, wc]; writer: [V, C, hc, wc] for V variants
  at::Tensor t5;                   // [T, D]
  at::Tensor pooled;               // [P]
  at::Tensor target_pixels;               // [3, H, W] uint8 (storage "pixels")
  std::vector<at::Tensor> cond_pixels;    // per condition column [3, Hc, Wc] uint8 (storage "pixels")
  bool caption_dropped = false;           // caption dropout drew this sample (caption is " ")
  std::string caption;
  std::string target_path;                // source image (informative)
  std::vector<std::string> cond_paths;
};

struct DatasetInfo {
  std::string path;
  int64_t num_samples = 0;
  int64_t latent_channels = 16;
  int64_t text_len = 512, text_dim = 4096, pooled_dim = 768;
  std::vector<std::string> cond_kinds;     // per condition column: "subject" | "spatial"
  std::string latent_dtype = "float32";    // as stored
  std::string embed_dtype = "bfloat16";
  int64_t max_target_hw = 0, max_cond_hw = 0;  // largest latent side over all samples
  int64_t max_target_area = 0;                 // largest h * w of a target latent
  // Version 2 (fluxtrain prepare); version-1 files read as the defaults.
  int64_t version = 1;
  std::string storage = "latents";         // "latents" | "pixels" (latents not cached: VAE online)
  bool bucketed = false;                   // batches are drawn from one target shape each
  bool has_text_embeddings = true;         // /t5 and /clip_pooled present
  bool has_dropout_embeddings = false;     // /text_dropout: embeddings of the caption " "
  double caption_dropout = 0;              // probability, drawn per (seed, epoch, sample)
  std::vector<int64_t> cond_variants;      // per condition column: cached augmentation variants (>= 1)
  int64_t num_conditions() const { return static_cast<int64_t>(cond_kinds.size()); }
};

// Reader. Opening validates the whole layout (index consistency, shapes) so that a bad file fails
// before training starts, with one line naming the file and what is wrong.
class Dataset {
 public:
  explicit Dataset(const std::string& path);
  const DatasetInfo& info() const { return info_; }
  int64_t size() const { return info_.num_samples; }
  Sample read(int64_t i) const;  // thread-safe (HDF5 calls are serialised); no random draws
  // The sample as training sees it in `epoch` of a run seeded `seed` (data/augment.h): caption
  // dropout, the cached subject variant, and (storage "pixels") the subject augmentation applied
  // to the pixels. Same (seed, epoch, i), same result, whatever the batch layout or rank count.
  Sample read(int64_t i, uint64_t seed, uint64_t epoch) const;
  // Every stored variant of condition column k of sample i: [V, C, h, w] (pixels: [1, 3, H, W]).
  at::Tensor read_condition_variants(int64_t i, int64_t k) const;
  // Target shape key of every sample (the buckets of a bucketed dataset): samples with equal
  // keys have equal target sizes.
  std::vector<int64_t> target_shape_ids() const;
  // Shapes against the model and the run's options: latent channels (4C = in_channels), T5 width,
  // CLIP width, condition count (lora_num in easycontrol mode; -1 = no check), targets against
  // --noise_size (area <= noise_size^2: aspect buckets), conditions against --cond_size (side).
  // text_online / vae_online: the run encodes captions / images itself, so a dataset without
  // cached text embeddings / latents is accepted.
  void check_compatible(const FluxConfig& model, int64_t expected_conditions, int64_t noise_size,
                        int64_t cond_size, bool text_online = false, bool vae_online = false) const;

 private:
  struct Column {
    std::string group;
    at::Tensor shape, offset;  // [R, 3] int64, [R] int64; R = N x variants
    int64_t variants = 1;
  };
  at::Tensor dropout_t5_, dropout_pooled_;  // embeddings of " " (caption dropout)
  h5::File file_;
  DatasetInfo info_;
  Column target_;
  std::vector<Column> conds_;
  std::vector<std::string> captions_, target_paths_;
  std::vector<std::vector<std::string>> cond_paths_;
  at::Tensor read_latent(const Column& c, int64_t row) const;
  Sample read_impl(int64_t i, const SampleDraws* draws) const;
};

// Writer: samples are appended one by one (chunked, compressed); finish() writes the index and
// attributes and renames the temp file over `path`. Without finish() the temp file is removed.
struct DatasetSpec {
  int64_t latent_channels = 16;
  int64_t text_len = 512, text_dim = 4096, pooled_dim = 768;
  std::vector<std::string> cond_kinds;            // "subject" | "spatial"
  at::ScalarType latent_dtype = at::kFloat;        // float32 | bfloat16 | float16
  at::ScalarType embed_dtype = at::kBFloat16;      // T5 and CLIP: bfloat16 | float16 | float32
  // Version-2 features (any of them set -> the file is written as version 2).
  bool version2 = false;
  std::string storage = "latents";                 // "pixels": add() takes target_pixels/cond_pixels
  bool text_embeddings = true;                     // false: no /t5, /clip_pooled (captions only)
  std::vector<int64_t> cond_variants;              // per column, default 1; V > 1: conds[k] is [V, C, h, w]
  double caption_dropout = 0;
  bool bucketed = false;
  at::Tensor dropout_t5, dropout_pooled;           // embeddings of " " ([T, D], [P]) when text is cached
};

class DatasetWriter {
 public:
  DatasetWriter(const std::string& path, const DatasetSpec& spec);
  ~DatasetWriter();
  DatasetWriter(const DatasetWriter&) = delete;
  DatasetWriter& operator=(const DatasetWriter&) = delete;
  void add(const Sample& s);
  // The open temp file, for extra groups/attributes (prepare's hashes) before finish().
  h5::File& file() { return *file_; }
  int64_t size() const { return n_; }
  void finish();

 private:
  struct Col {
    std::string group;
    h5::Appendable data;
    std::vector<int64_t> shapes, offsets;
    int64_t total = 0;
  };
  std::string path_, tmp_;
  DatasetSpec spec_;
  std::unique_ptr<h5::File> file_;
  std::vector<Col> cols_;  // target, then conditions
  h5::Appendable t5_, pooled_;
  std::vector<std::string> captions_, target_paths_;
  std::vector<std::vector<std::string>> cond_paths_;
  int64_t n_ = 0;
  bool done_ = false;
};

class DataOrder {
 public:
  DataOrder(int64_t num_samples, int64_t batch_size, int rank, int world_size, uint64_t seed);
  // Bucketed order: every global micro-batch holds samples of one bucket (bucket[i] of sample i).
  // Per epoch, each bucket is shuffled (seed, epoch, bucket) and cut into global batches of
  // world_size * batch_size (each bucket's remainder is left out that epoch), and the list of
  // global batches is shuffled (seed, epoch). Ranks take their slices as above, so all ranks
  // work on the same bucket at the same micro-batch.
  DataOrder(const std::vector<int64_t>& bucket, int64_t batch_size, int rank, int world_size, uint64_t seed);
  // The order a dataset asks for: bucketed when it says so, the plain permutation otherwise.
  static DataOrder for_dataset(const Dataset& ds, int64_t batch_size, int rank, int world_size, uint64_t seed);
  uint64_t seed() const { return seed_; }
  int64_t micro_batches_per_epoch() const { return per_epoch_; }
  int64_t epoch_of(int64_t micro_batch) const { return micro_batch / per_epoch_; }
  // Sample indices of this rank's part of global micro-batch m.
  std::vector<int64_t> indices(int64_t micro_batch) const;
  // The epoch's sample stream: a permutation of all samples (bucketed: the global batches in
  // order, micro_batches_per_epoch() * world_size * batch_size samples).
  std::vector<int64_t> permutation(int64_t epoch) const;

 private:
  int64_t n_, batch_, per_epoch_;
  int rank_, world_;
  uint64_t seed_;
  std::vector<std::vector<int64_t>> buckets_;  // bucketed order: sample ids per bucket
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> cached_;
};

struct Batch {
  int64_t micro_batch = 0;  // global position in the data stream
  int64_t epoch = 0;
  std::vector<Sample> samples;
  // What the consumer's prepare hook made of the samples on the prefetch thread (the trainer:
  // its host-side inputs, train/trainer.h); empty without a hook.
  std::any prepared;
};

// Reads micro-batches start, start+1, ... on a background thread, keeping up to `depth` ready.
// `prepare`, when given, runs on that thread on each batch after it is read (work that depends
// only on the batch, moved off the consumer's critical path). An error on the thread (corrupt
// chunk, a throwing hook, ...) is rethrown by next().
class Prefetcher {
 public:
  using PrepareFn = std::function<void(Batch&)>;
  Prefetcher(const Dataset& ds, const DataOrder& order, int64_t start_micro_batch, int64_t depth,
             PrepareFn prepare = {});
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;
  Batch next();

 private:
  const Dataset& ds_;
  DataOrder order_;
  int64_t next_read_, depth_;
  PrepareFn prepare_;
  std::deque<Batch> ready_;
  std::exception_ptr error_;
  bool stop_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
  void run();
};

}  // namespace fluxtrain
