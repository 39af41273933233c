#include "bench/profile_trace.h"

#include <set>

#include <torch/csrc/autograd/profiler_kineto.h>

#include "core/error.h"

namespace fluxtrain {

void profile_to_chrome_trace(const std::function<void()>& fn, const std::function<void()>& sync, bool cuda,
                             const std::string& path) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  using torch::profiler::impl::ProfilerConfig;
  using torch::profiler::impl::ProfilerState;
  std::set<ActivityType> activities{ActivityType::CPU};
  if (cuda) activities.insert(ActivityType::CUDA);
  const ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/false, /*profile_memory=*/false);
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  fn();
  sync();
  std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
  if (!result) throw Error("--profile: the profiler returned no result");
  result->save(path);
}

}  // namespace fluxtrain
