// "[3072, 64]": a tensor shape as messages print it.
#pragma once
#include <string>

#include <c10/util/ArrayRef.h>

namespace fluxtrain {
std::string shape_str(c10::IntArrayRef s);
}  // namespace fluxtrain
