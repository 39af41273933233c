#pragma once
#include <string>

#include <c10/core/Device.h>

namespace fluxtrain {
// "NVIDIA H100 80GB HBM3" for a CUDA device, "cpu (N threads)" otherwise.
std::string device_name(const c10::Device& d);
}  // namespace fluxtrain
