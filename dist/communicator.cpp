#include "dist/communicator.h"

#include <ATen/ATen.h>

namespace fluxtrain::dist {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Avg: return "avg";
    case ReduceOp::Max: return "max";
  }
  return "?";
}

at::Tensor Communicator::all_gather(const at::Tensor& in) {
  std::vector<int64_t> shape{size()};
  for (int64_t d : in.sizes()) shape.push_back(d);
  at::Tensor out = at::empty(shape, in.options());
  all_gather(out, in);
  return out;
}

bool Communicator::gathers_in_place(const at::Tensor& out, const at::Tensor& in) const {
  return in.data_ptr() == static_cast<char*>(out.data_ptr()) + static_cast<int64_t>(rank()) * in.nbytes();
}

}  // namespace fluxtrain::dist
