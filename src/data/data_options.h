// Options of the training data: the dataset, batch size and the size bounds of its latents.
#pragma once
#include <cstdint>
#include <string>

namespace fluxtrain {

class OptionSet;

struct DataConfig {
  std::string train_data;          // HDF5 dataset (docs/dataset.md)
  int64_t train_batch_size = 1;    // per rank, per micro-batch
  // Pixels. Today a bound on the pre-encoded latents of the dataset (condition latents may not
  // be larger than cond_size / 8, targets not larger than noise_size / 8); `prepare` will make
  // them the condition and target image sizes EasyControl's users know.
  int64_t cond_size = 512;
  int64_t noise_size = 1024;
  int64_t prefetch_batches = 2;    // micro-batches the background reader keeps ready
};

void declare_options(OptionSet& s, DataConfig& c);

}  // namespace fluxtrain
