#include "bench/step_runner.h"

namespace fluxtrain {
namespace {
class EagerRunner : public StepRunner {
 public:
  explicit EagerRunner(std::function<void()> s) : step_(std::move(s)) {}
  void run() override { step_(); }
  std::string mode() const override { return "eager"; }

 private:
  std::function<void()> step_;
};
}  // namespace

std::unique_ptr<StepRunner> make_eager_runner(std::function<void()> step) {
  return std::make_unique<EagerRunner>(std::move(step));
}

#ifndef FLUXTRAIN_WITH_CUDA
std::unique_ptr<StepRunner> make_cuda_graph_runner(std::function<void()>, int) { return nullptr; }
#endif

}  // namespace fluxtrain
