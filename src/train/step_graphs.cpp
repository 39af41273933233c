#include "train/step_graphs.h"

namespace fluxtrain {

#ifndef FLUXTRAIN_WITH_CUDA
std::unique_ptr<StepGraphs> make_step_graphs(c10::Device) { return nullptr; }
#endif

}  // namespace fluxtrain
