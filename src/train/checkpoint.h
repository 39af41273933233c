// Training checkpoints: one HDF5 file per checkpoint, <output_dir>/checkpoint-<step>.h5
// (layout: docs/checkpoint.md). Built in memory, written to "<file>.tmp.<pid>" and renamed into
// place, so a file with the final name is always complete; `latest` only considers final names.
// The first 512 bytes (an HDF5 user block, skipped by HDF5 readers) hold a text header with the
// run id, the step, the file size and a CRC-32 of the whole file, verified before HDF5 parses
// anything: bit flips, truncation and partial copies are detected on load.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/tensor_map.h"
#include "model/flux_config.h"
#include "model/lora.h"

namespace fluxtrain {

struct TrainState {
  int64_t step = 0;                // completed optimizer updates
  int64_t micro_batch = 0;         // next global micro-batch of the data stream
  int64_t nonfinite_in_a_row = 0;
  int64_t nonfinite_total = 0;
  int64_t optimizer_steps = 0;     // AdamW's t (bias correction)
  uint64_t seed = 0;               // every draw derives from it (no other RNG state exists)
  double lr = 0;                   // learning rate of the last update (informative)
  // Samples per global micro-batch (train_batch_size x ranks). micro_batch counts global
  // micro-batches, so a run resumes on any number of ranks that keeps this fixed.
  int64_t global_batch = 0;
  // Identifies one training run across resumes (a resumed run keeps it): pruning deletes only
  // checkpoints of this run. A default-constructed state (a new run) draws a fresh id.
  std::string run_id = new_run_id();
  static std::string new_run_id();
};

struct Checkpoint {
  TrainState state;
  TensorMap lora;          // LoraSet::state() keys, float32 masters
  TensorMap optimizer;     // AdamW::state() keys
  FluxConfig model;        // the transformer it was trained on
  nlohmann::json config;   // resolved RunConfig::to_json()
  nlohmann::json scheduler;  // {"kind", "base_lr", "warmup_steps", "total_steps"}
};

std::string checkpoint_path(const std::string& output_dir, int64_t step);
// Complete checkpoints in dir (final names only), sorted by step.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& output_dir);
// Newest checkpoint in dir that loads and verifies, or "" if there is none. Each newer one that
// does not verify is skipped with a line "skipping <file>: <reason>" in *skipped, or on stderr
// (prefixed "warning: ") when skipped is null.
std::string latest_checkpoint(const std::string& output_dir, std::vector<std::string>* skipped = nullptr);

// Writes atomically. The environment variable FLUXTRAIN_TEST_ABORT_BEFORE_RENAME=<step> makes the
// process die (exit 134, no cleanup) after the temp file of that step is written and before it is
// renamed: the test of a checkpoint killed mid-write.
void save_checkpoint(const std::string& path, const Checkpoint& ck);
Checkpoint load_checkpoint(const std::string& path);
// Keeps the newest `limit` checkpoints of the run that this process last saved a checkpoint of
// (limit 0 = keep all); checkpoints of other runs (another run id, older files without one,
// unreadable ones) are never deleted. Returns the removed paths.
std::vector<std::string> prune_checkpoints(const std::string& output_dir, int64_t limit);
// Checks a checkpoint without loading it into tensors: "" when it verifies, else the reason.
std::string verify_checkpoint(const std::string& path);
// The run id in a checkpoint's header ("" for files without one or unreadable ones).
std::string checkpoint_run_id(const std::string& path);
// Removes leftovers of interrupted writes in dir ("<name>.tmp.<pid>" of fluxtrain's outputs whose
// process is gone); returns the removed paths.
std::vector<std::string> remove_stale_temp_files(const std::string& dir);
// A resumed step at or past the run's last update is an Error naming both (nothing to train).
void check_resume_step(const std::string& path, int64_t step, int64_t max_steps);

// Model and LoRA structure must match the run that is resuming; a checkpoint of another model
// size is an Error naming the file and the differing dimension.
void check_checkpoint_matches(const Checkpoint& ck, const std::string& path, const FluxConfig& model,
                              const LoraSet& lora);

nlohmann::json flux_config_json(const FluxConfig& c);

}  // namespace fluxtrain
