#include "core/progress.h"

#include <unistd.h>

#include <cmath>
#include <fstream>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"

namespace fluxtrain {

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(t / 3600), (long long)(t / 60 % 60), (long long)(t % 60));
  else std::snprintf(buf, sizeof buf, "%lld:%02lld", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

Progress::Progress(int64_t total, int64_t start, std::FILE* out, int tty, int64_t log_every)
    : total_(total), start_(start), out_(out), log_every_(std::max<int64_t>(1, log_every)),
      t0_(std::chrono::steady_clock::now()) {
  tty_ = tty < 0 ? ::isatty(fileno(out)) != 0 : tty != 0;
}

void Progress::update(int64_t step, double loss, double lr, double sps) {
  const double eta = sps * static_cast<double>(total_ - step);
  char line[256];
  if (std::isnan(loss))  // sampling: no loss and no learning rate to show
    std::snprintf(line, sizeof line, "step %lld/%lld  %.3g s/step  ETA %s", (long long)step, (long long)total_, sps,
                  format_duration(eta).c_str());
  else
    std::snprintf(line, sizeof line, "step %lld/%lld  loss %.4g  lr %.3g  %.3g s/step  ETA %s", (long long)step,
                  (long long)total_, loss, lr, sps, format_duration(eta).c_str());
  if (tty_) {
    const int width = 24;
    const double frac = total_ > 0 ? static_cast<double>(step) / static_cast<double>(total_) : 1.0;
    const int filled = static_cast<int>(frac * width);
    std::string bar = "[" + std::string(filled, '#') + std::string(width - filled, '.') + "]";
    std::fprintf(out_, "\r\033[K%s %3d%% %s", bar.c_str(), static_cast<int>(frac * 100), line);
    bar_shown_ = true;
  } else if (step == total_ || step % log_every_ == 0 || step == start_ + 1) {
    std::fprintf(out_, "%s\n", line);
  }
  std::fflush(out_);
}

void Progress::message(const std::string& msg) {
  if (tty_ && bar_shown_) std::fprintf(out_, "\r\033[K");
  std::fprintf(out_, "%s\n", msg.c_str());
  bar_shown_ = false;
  std::fflush(out_);
}

void Progress::finish() {
  if (tty_ && bar_shown_) std::fprintf(out_, "\n");
  bar_shown_ = false;
  std::fflush(out_);
}

MetricsWriter::MetricsWriter(const std::string& path, int64_t resume_step) : path_(path) {
  if (resume_step >= 0 && path_exists(path)) {
    // Keep the lines up to the resumed step; the interrupted run's later lines are replaced.
    std::ifstream in(path);
    std::string line, kept;
    while (std::getline(in, line)) {
      try {
        auto j = nlohmann::json::parse(line);
        if (j.value("step", int64_t{0}) > resume_step) continue;
      } catch (const std::exception&) {
        continue;  // a torn last line from a killed run
      }
      kept += line + "\n";
    }
    write_text_file_atomic(path, kept);
  }
  f_ = std::fopen(path.c_str(), resume_step >= 0 ? "a" : "w");
  if (!f_) throw Error(path + ": cannot open for writing");
}

MetricsWriter::~MetricsWriter() {
  if (f_) std::fclose(f_);
}

void MetricsWriter::write(const nlohmann::json& j) {
  if (!f_) return;
  const std::string s = j.dump() + "\n";
  std::fwrite(s.data(), 1, s.size(), f_);
  std::fflush(f_);
}

}  // namespace fluxtrain
