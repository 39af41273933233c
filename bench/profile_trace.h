// One call of a function under LibTorch's profiler (Kineto), written as a Chrome trace: what the
// bench's --profile uses to find where a step's GPU time goes (bench/kernel_classes.py sums the
// trace's kernels by class). Kept apart so the profiler's headers stay out of the other files.
#pragma once
#include <functional>
#include <string>

namespace fluxtrain {

// Runs fn once with CPU (and, when cuda, CUDA kernel) activity recorded; sync is called before
// the profiler stops so that every kernel fn queued is in the trace. Writes the trace to path.
void profile_to_chrome_trace(const std::function<void()>& fn, const std::function<void()>& sync, bool cuda,
                             const std::string& path);

}  // namespace fluxtrain
