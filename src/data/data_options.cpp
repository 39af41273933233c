#include "data/data_options.h"

#include "core/options.h"

namespace fluxtrain {

void declare_options(OptionSet& s, DataConfig& c) {
  s.group("Data", "data")
      .add("train_data", &c.train_data, "HDF5 dataset of encoded samples (docs/dataset.md; required)")
      .add("train_batch_size", &c.train_batch_size, "samples per micro-batch",
           rules::positive())
      .add("cond_size", &c.cond_size,
           "condition size in pixels (multiple of 16); today the largest condition latent accepted from the dataset "
           "is cond_size/8 per side",
           rules::multiple_of_16())
      .add("noise_size", &c.noise_size,
           "target size in pixels (multiple of 16); today the largest target latent accepted from the dataset is "
           "noise_size/8 per side",
           rules::multiple_of_16())
      .add("prefetch_batches", &c.prefetch_batches, "micro-batches the background reader keeps ready",
           rules::positive());
}

}  // namespace fluxtrain
