// Progress output (bar on a terminal, plain lines otherwise) and metrics.jsonl resume trimming.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "support/test_util.h"
#include "core/progress.h"

namespace fluxtrain {
namespace {

std::string read_all(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string s;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
  return s;
}

TEST(Progress, PlainLinesWhenNotATerminal) {
  std::FILE* f = std::tmpfile();
  Progress p(100, 0, f, /*tty=*/0, /*log_every=*/25);
  for (int s = 1; s <= 100; ++s) p.update(s, 0.5, 1e-4, 0.2);
  p.message("saved x");
  p.finish();
  const std::string out = read_all(f);
  std::fclose(f);
  EXPECT_EQ(out.find('\r'), std::string::npos);
  // step 1 (first), 25, 50, 75, 100, and the message
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 6) << out;
  EXPECT_NE(out.find("step 50/100  loss 0.5  lr 0.0001  0.2 s/step  ETA 0:10"), std::string::npos) << out;
  EXPECT_NE(out.find("step 100/100"), std::string::npos);
}

TEST(Progress, OneRedrawnBarOnATerminal) {
  std::FILE* f = std::tmpfile();
  Progress p(10, 0, f, /*tty=*/1);
  for (int s = 1; s <= 10; ++s) p.update(s, 1.0, 1e-3, 1.0);
  p.message("note");
  p.finish();
  const std::string out = read_all(f);
  std::fclose(f);
  EXPECT_EQ(std::count(out.begin(), out.end(), '\r'), 11) << out;  // 10 redraws + clearing for the message
  EXPECT_NE(out.find("[############............]  50%"), std::string::npos) << out;
  EXPECT_NE(out.find("note\n"), std::string::npos);
  EXPECT_EQ(format_duration(3725), "1:02:05");
  EXPECT_EQ(format_duration(65), "1:05");
}

TEST(Metrics, ResumeDropsLinesAfterTheResumedStep) {
  TempDir tmp;
  const std::string path = tmp.path("metrics.jsonl");
  {
    MetricsWriter w(path, -1);
    for (int s = 1; s <= 5; ++s) w.write({{"step", s}});
  }
  { std::ofstream(path, std::ios::app) << "{\"step\": 6, \"tor"; }  // a torn line from a kill
  {
    MetricsWriter w(path, 3);
    w.write({{"step", 4}});
  }
  std::ifstream in(path);
  std::vector<int> steps;
  for (std::string line; std::getline(in, line);) steps.push_back(nlohmann::json::parse(line)["step"]);
  EXPECT_EQ(steps, (std::vector<int>{1, 2, 3, 4}));
}

}  // namespace
}  // namespace fluxtrain
