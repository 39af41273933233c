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
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/hdf5_io.h"

namespace fluxtrain {

struct FluxConfig;

// One encoded sample as stored. Latents are [C, h, w] (h, w = pixels / 8).
struct Sample {
  int64_t index = -1;              // row in the file
  at::Tensor target;               // [C, h, w]
  std::vector<at::Tensor> conds;   // per condition column [C, hc, wc]
  at::Tensor t5;                   // [T, D]
  at::Tensor pooled;               // [P]
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
  int64_t num_conditions() const { return static_cast<int64_t>(cond_kinds.size()); }
};

// Reader. Opening validates the whole layout (index consistency, shapes) so that a bad file fails
// before training starts, with one line naming the file and what is wrong.
class Dataset {
 public:
  explicit Dataset(const std::string& path);
  const DatasetInfo& info() const { return info_; }
  int64_t size() const { return info_.num_samples; }
  Sample read(int64_t i) const;  // thread-safe (HDF5 calls are serialised)
  // Shapes against the model and the run's options: latent channels (4C = in_channels), T5 width,
  // CLIP width, condition count (lora_num in easycontrol mode; -1 = no check), sizes against
  // --noise_size / --cond_size (pixels).
  void check_compatible(const FluxConfig& model, int64_t expected_conditions, int64_t noise_size,
                        int64_t cond_size) const;

 private:
  struct Column {
    std::string group;
    at::Tensor shape, offset;  // [N, 3] int64, [N] int64
  };
  h5::File file_;
  DatasetInfo info_;
  Column target_;
  std::vector<Column> conds_;
  std::vector<std::string> captions_, target_paths_;
  std::vector<std::vector<std::string>> cond_paths_;
  at::Tensor read_latent(const Column& c, int64_t i) const;
};

// Writer: samples are appended one by one (chunked, compressed); finish() writes the index and
// attributes and renames the temp file over `path`. Without finish() the temp file is removed.
struct DatasetSpec {
  int64_t latent_channels = 16;
  int64_t text_len = 512, text_dim = 4096, pooled_dim = 768;
  std::vector<std::string> cond_kinds;            // "subject" | "spatial"
  at::ScalarType latent_dtype = at::kFloat;        // float32 | bfloat16 | float16
  at::ScalarType embed_dtype = at::kBFloat16;      // T5 and CLIP: bfloat16 | float16 | float32
};

class DatasetWriter {
 public:
  DatasetWriter(const std::string& path, const DatasetSpec& spec);
  ~DatasetWriter();
  DatasetWriter(const DatasetWriter&) = delete;
  DatasetWriter& operator=(const DatasetWriter&) = delete;
  void add(const Sample& s);
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
  int64_t micro_batches_per_epoch() const { return per_epoch_; }
  int64_t epoch_of(int64_t micro_batch) const { return micro_batch / per_epoch_; }
  // Sample indices of this rank's part of global micro-batch m.
  std::vector<int64_t> indices(int64_t micro_batch) const;
  // The epoch's permutation of all samples.
  std::vector<int64_t> permutation(int64_t epoch) const;

 private:
  int64_t n_, batch_, per_epoch_;
  int rank_, world_;
  uint64_t seed_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> cached_;
};

struct Batch {
  int64_t micro_batch = 0;  // global position in the data stream
  int64_t epoch = 0;
  std::vector<Sample> samples;
};

// Reads micro-batches start, start+1, ... on a background thread, keeping up to `depth` ready.
// An error on the thread (corrupt chunk, ...) is rethrown by next().
class Prefetcher {
 public:
  Prefetcher(const Dataset& ds, const DataOrder& order, int64_t start_micro_batch, int64_t depth);
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;
  Batch next();

 private:
  const Dataset& ds_;
  DataOrder order_;
  int64_t next_read_, depth_;
  std::deque<Batch> ready_;
  std::exception_ptr error_;
  bool stop_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
  void run();
};

}  // namespace fluxtrain
