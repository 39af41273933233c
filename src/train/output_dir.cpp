#include "train/output_dir.h"

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "train/run_config.h"
#include "core/error.h"
#include "core/fs.h"
#include "train/checkpoint.h"

namespace fluxtrain {

namespace {

// Files a run writes into its output folder (besides checkpoints).
const char* const kRunFiles[] = {"metrics.jsonl",           "config.json",
                                 "lora.safetensors",        "lora_masters.safetensors",
                                 "lora_kohya.safetensors",  "lora_diffusers.safetensors",
                                 "text_encoder_lora.safetensors"};

bool starts_new_run(const CheckpointConfig& c) { return c.resume_from_checkpoint.empty(); }

std::string first_free_previous_dir(const std::string& out) {
  for (int n = 1;; ++n) {
    const std::string p = path_join(out, "previous-run-" + std::to_string(n));
    if (!path_exists(p)) return p;
  }
}

}  // namespace

void check_output_dir(const CheckpointConfig& c) {
  if (!starts_new_run(c) || c.overwrite_output_dir || !is_directory(c.output_dir)) return;
  const auto found = list_checkpoints(c.output_dir);
  if (found.empty()) return;
  std::string names;
  const size_t shown = 3;
  for (size_t i = 0; i < found.size() && i < shown; ++i) {
    const std::string& p = found[found.size() - 1 - i].second;  // newest first
    names += (i ? ", " : "") + p.substr(p.find_last_of('/') + 1);
  }
  if (found.size() > shown) names += ", ... (" + std::to_string(found.size()) + " in all)";
  throw Error("--output_dir " + c.output_dir + " holds checkpoints of another run (" + names +
              "): add --resume_from_checkpoint latest to continue that run, --overwrite_output_dir to start a new "
              "run there (the earlier outputs are moved to " +
              path_join(c.output_dir, "previous-run-N") + "), or choose another --output_dir");
}

std::vector<std::string> prepare_output_dir(const CheckpointConfig& c) {
  check_output_dir(c);
  std::vector<std::string> said;
  const std::string& out = c.output_dir;
  if (starts_new_run(c) && c.overwrite_output_dir) {
    std::vector<std::string> names;
    for (const auto& ck : list_checkpoints(out)) names.push_back(ck.second.substr(ck.second.find_last_of('/') + 1));
    for (const char* f : kRunFiles)
      if (path_exists(path_join(out, f)) && !is_directory(path_join(out, f))) names.push_back(f);
    // TensorBoard's folder (a plain relative --logging_dir): the new run's series start afresh.
    const std::string& ld = c.logging_dir;
    if (!ld.empty() && ld.find('/') == std::string::npos && ld != "." && ld != ".." && is_directory(path_join(out, ld)))
      names.push_back(ld);
    if (!names.empty()) {
      const std::string dest = first_free_previous_dir(out);
      make_directories(dest);
      for (const auto& n : names) {
        const std::string from = path_join(out, n), to = path_join(dest, n);
        if (std::rename(from.c_str(), to.c_str()) != 0)
          throw Error("--overwrite_output_dir: cannot move " + from + " to " + dest + " (" + std::strerror(errno) + ")");
      }
      said.push_back("--overwrite_output_dir: moved the earlier run's " + std::to_string(names.size()) +
                     " file(s) to " + dest);
    }
  }
  for (const auto& p : remove_stale_temp_files(out)) said.push_back("removed " + p + " (left by an interrupted write)");
  return said;
}

}  // namespace fluxtrain
