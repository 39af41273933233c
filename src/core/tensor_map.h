// A named set of tensors, ordered by name so that files and iteration are deterministic.
#pragma once
#include <ATen/core/Tensor.h>
#include <map>
#include <string>

namespace fluxtrain {
using TensorMap = std::map<std::string, at::Tensor>;
}
