// Progress and metrics. On a terminal: one progress bar line redrawn in place (step/total, loss,
// lr, s/step, ETA). Otherwise (logs, CI): one plain line every `log_every` updates. Every update
// also appends one JSON object to <output_dir>/metrics.jsonl.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace fluxtrain {

class Progress {
 public:
  // tty < 0: detect from the stream; 0/1 force.
  Progress(int64_t total_steps, int64_t start_step, std::FILE* out = stderr, int tty = -1, int64_t log_every = 10);
  // loss NaN: neither loss nor lr is shown (sampling).
  void update(int64_t step, double loss, double lr, double seconds_per_step);
  // A message on its own line (the bar is redrawn after it on a terminal).
  void message(const std::string& line);
  void finish();
  bool is_tty() const { return tty_; }

 private:
  int64_t total_, start_;
  std::FILE* out_;
  bool tty_;
  int64_t log_every_;
  bool bar_shown_ = false;
  std::chrono::steady_clock::time_point t0_;
};

// Appends one JSON object per line and flushes it. On resume, lines of steps after the resumed
// step (written by the interrupted run) are dropped first so that the file has each step once.
class MetricsWriter {
 public:
  MetricsWriter() = default;
  MetricsWriter(const std::string& path, int64_t resume_step);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;
  void write(const nlohmann::json& j);

 private:
  std::FILE* f_ = nullptr;
  std::string path_;
};

std::string format_duration(double seconds);

}  // namespace fluxtrain
