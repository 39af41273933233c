// The median the timing commands report: the upper middle of the sorted values, so always one of
// the values (bench's gpu_power, encode --bench).
#pragma once
#include <algorithm>
#include <vector>

namespace fluxtrain {

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace fluxtrain
