// The output folder of `fluxtrain train`: one run's checkpoints, metrics.jsonl, config.json and
// lora.safetensors. Two runs must never mix there: `latest` would resume the other run, and
// pruning would delete its checkpoints (or the new run's own fresh ones).
//
// Rules:
//  * A folder holding checkpoints is refused unless --resume_from_checkpoint says to continue
//    (latest, or a PATH) or --overwrite_output_dir says to start anew; then the earlier run's
//    outputs are moved (never deleted) to <output_dir>/previous-run-<N>/.
//  * Pruning (--checkpoints_total_limit, train/checkpoint.cpp) only ever deletes checkpoints
//    carrying this run's id, so another run's files survive even when they share a folder.
//  * Leftovers of interrupted writes ("<name>.tmp.<pid>" of a process that is gone) are removed
//    when a run starts.
#pragma once
#include <string>
#include <vector>

namespace fluxtrain {

struct CheckpointConfig;

// Throws Error naming --output_dir, the checkpoints found and the three ways on. Writes nothing.
void check_output_dir(const CheckpointConfig& c);

// At the start of a run (rank 0, after every input check, before anything is written):
// check_output_dir(), then the move of --overwrite_output_dir and the temp-file clean-up.
// Returns one line per action for the log.
std::vector<std::string> prepare_output_dir(const CheckpointConfig& c);

}  // namespace fluxtrain
